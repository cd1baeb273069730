"""MoEfication evidence on a real (small) model: sparsity, split quality, routing quality.

Pre-trains a small ReLU GPT-2 from a config on the Shakespeare corpus (dense, a few hundred
steps), records FFN inputs on held-out validation text, and reports per layer:

* activation sparsity;
* coverage at k/E = 1/4 (share of each token's activation mass inside the chosen experts) for
  the k-means, co-activation and random splits: "oracle" (the top-k experts by true mass), and
  with the centroid and the MLP router picking the experts;
* the mean number of experts dynamic-k needs for 90% coverage (oracle, and with the MLP router's
  predicted mass, with the coverage it actually reaches).

Routers are fitted on one half of the recorded tokens and scored on the other half. Also times
balanced k-means on 12 layers of 768 x 3072 (the SPEC target: <= 10 s on 2 cores).

    python bench/moefication.py                 # ~5 minutes on 2 cores
    python bench/moefication.py --steps 100     # quicker, less trained
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from ssdfx.cli import positive_int
from ssdfx.stats import expert_mass, observe
from ssdfx.routing import build_router, select_dynamic_k, select_top_k, train_mlp_router
from ssdfx.split import coactivation_split, kmeans_split, random_split
from ssdfx.stability import coverage, oracle_mean_k, routed_coverage
from ssdfx.train import TrainConfig, Trainer


def split_timing(layers: int = 12, d: int = 768, f: int = 3072, experts: int = 16) -> float:
    """Seconds to k-means-split `layers` FFNs of d x f (after one warm-up for numba's JIT)."""
    from ssdfx.split import balanced_kmeans

    g = torch.Generator().manual_seed(0)
    ws = [torch.nn.functional.normalize(torch.randn(f, d, generator=g), dim=1) for _ in range(layers)]
    balanced_kmeans(ws[0][:64, :8].contiguous(), 4)
    t0 = time.perf_counter()
    for w in ws:
        balanced_kmeans(w, experts)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=300, help="dense pre-training steps")
    ap.add_argument("--n-layer", type=positive_int, default=4)
    ap.add_argument("--n-embd", type=positive_int, default=256)
    ap.add_argument("--ctx", type=positive_int, default=128)
    ap.add_argument("--experts", type=positive_int, default=16,
                    help="E; it must divide the FFN width 4 * n-embd")
    ap.add_argument("--k", type=positive_int, default=4, help="k <= E (k/E = 1/4 by default)")
    ap.add_argument("--probe-batches", type=positive_int, default=8,
                    help="validation batches recorded")
    ap.add_argument("--out", default="bench/results", help="where to write moefication.csv/.md")
    args = ap.parse_args(argv)
    if 4 * args.n_embd % args.experts:
        ap.error(f"--experts {args.experts} does not divide the FFN width 4 * --n-embd = "
                 f"{4 * args.n_embd}")
    if args.k > args.experts:
        ap.error(f"--k {args.k} exceeds --experts {args.experts}")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = TrainConfig(mode="dense", steps=args.steps, n_layer=args.n_layer, n_embd=args.n_embd, ctx=args.ctx, progress=False,
                      activation="relu", check_every=0, eval_every=max(1, args.steps // 4), save_final=False,
                      out_dir=str(out / "moefication_run"), num_experts=args.experts, top_k=args.k)
    t0 = time.perf_counter()
    tr = Trainer(cfg, overwrite=True)  # the run is this script's own scratch directory
    result = tr.run()
    print(f"pre-trained {args.steps} steps in {time.perf_counter() - t0:.0f} s, val loss {result['val_loss_dense']:.3f}")
    model = tr.model.eval()
    probe = [tr._inputs(tr.data.batch("val", cfg.batch_size, cfg.ctx, seed=123, step=i)) for i in range(args.probe_batches)]
    stats = observe(model, probe, max_tokens=args.probe_batches * cfg.batch_size * cfg.ctx)

    e, k = args.experts, args.k
    rows = []
    for layer, (name, st) in enumerate(stats.items()):
        n = st.x.shape[0]
        fit, test = slice(0, n // 2), slice(n // 2, n)
        mass_fit, mass_test = st.mass[fit], st.mass[test]
        row = {"layer": layer, "sparsity": st.sparsity, "tokens": n}
        half = type(st)(st.site, st.x[fit], st.h[fit], st.eps)
        splits = {
            "kmeans": kmeans_split(st.site, model, e),
            "coactivation": coactivation_split(st.site, model, e, stats={name: half}),
            "random": random_split(st.site, model, e),
        }
        for sname, perm in splits.items():
            row[f"{sname}_oracle"] = coverage(mass_test, perm, e, k)
            centroid = build_router("centroid", st.site, model, perm, e)
            mlp = train_mlp_router(st.x[fit], expert_mass(mass_fit, perm, e))
            with torch.no_grad():
                for rname, router in (("centroid", centroid), ("mlp", mlp)):
                    idx, _ = select_top_k(router(st.x[test]), k)
                    row[f"{sname}_{rname}"] = routed_coverage(mass_test, perm, e, idx)
        perm = splits["kmeans"]
        row["dyn_oracle_k"] = oracle_mean_k(mass_test, perm, e, 0.9)
        mlp = train_mlp_router(st.x[fit], expert_mass(mass_fit, perm, e))
        with torch.no_grad():
            idx, _ = select_dynamic_k(mlp(st.x[test]), 0.9, e)
        row["dyn_mlp_k"] = (idx >= 0).sum(-1).float().mean().item()
        row["dyn_mlp_cov"] = routed_coverage(mass_test, perm, e, idx)
        rows.append(row)

    t_split = split_timing()
    with open(out / "moefication.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ("| layer | sparsity | kmeans oracle | kmeans centroid | kmeans MLP | coact oracle | coact centroid "
            "| coact MLP | random oracle | random centroid | random MLP | dyn-k 90% oracle k | dyn-k MLP k (coverage) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['sparsity']:.3f} | {r['kmeans_oracle']:.3f} | {r['kmeans_centroid']:.3f} | "
            f"{r['kmeans_mlp']:.3f} | {r['coactivation_oracle']:.3f} | {r['coactivation_centroid']:.3f} | "
            f"{r['coactivation_mlp']:.3f} | {r['random_oracle']:.3f} | {r['random_centroid']:.3f} | "
            f"{r['random_mlp']:.3f} | {r['dyn_oracle_k']:.2f} | {r['dyn_mlp_k']:.2f} ({r['dyn_mlp_cov']:.3f}) |")
    summary = (f"GPT-2 {args.n_layer}x{args.n_embd} (ReLU), {args.steps} dense steps on Shakespeare, val loss "
               f"{result['val_loss_dense']:.3f}; E={e}, k={k}; coverage on {rows[0]['tokens'] // 2} held-out tokens "
               f"per layer.\n\nBalanced k-means of 12 layers of 768x3072 (E=16): {t_split:.2f} s.\n")
    text = summary + "\n" + "\n".join(lines) + "\n"
    (out / "moefication.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
