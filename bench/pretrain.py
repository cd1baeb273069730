"""The paper's claims at small scale: dense vs SSD vs always-sparse pre-training on this CPU.

Same model, data, seed and token budget for every run. Writes each run to
bench/results/pretrain/<model>/<mode>/ (resumable: a finished run is not redone) and then:

* validation loss against wall time and against step (one plot, all runs);
* the wall time SSD needs to reach the dense run's final validation loss (within 1%);
* activation sparsity and the stability metric over pre-training (from the dense run, whose
  stability checks are logged but not charged to its time);
* the SSD-trained model used as an MoE: validation loss and FFN / whole-forward time against
  dense at k/E in {1/8, 1/4, 1/2} and with dynamic-k, timed in one run (interleaved medians).

    python bench/pretrain.py --model gpt2            # the full comparison (~60 min on 2 cores)
    python bench/pretrain.py --model gpt2 --modes dense,ssd,ssd_120,sparse --rounds 7   # RESULTS.md
    python bench/pretrain.py --model bert --modes dense   # sparsity/stability findings for BERT
    python bench/pretrain.py --quick                 # a 2-minute smoke run of the whole script
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import ssdfx
from ssdfx.checkpoint import finished_record
from ssdfx.cli import positive_int
from ssdfx.plot import read_log, sparse_spans
from ssdfx.train import MODES, TrainConfig, Trainer

FULL = dict(n_layer=6, n_embd=384, n_head=6, ctx=256, batch_size=16, steps=600, lr=1.5e-3, warmup=40,
            num_experts=16, top_k=4, check_every=25, patience=2, stability_tol=0.03, sparse_steps=200,
            final_dense_steps=40, eval_every=25, eval_batches=8, checkpoint_every=100, fixed_start=150,
            fixed_dense_steps=40)
QUICK = dict(n_layer=2, n_embd=64, n_head=2, ctx=64, batch_size=8, steps=120, lr=2e-3, warmup=10,
             num_experts=8, top_k=2, check_every=10, patience=2, stability_tol=0.05, sparse_steps=30,
             final_dense_steps=10, eval_every=10, eval_batches=4, checkpoint_every=50, fixed_start=40,
             fixed_dense_steps=10)


def run_dir(root: Path, model: str, mode: str) -> Path:
    return root / model / mode


def mode_settings(mode: str) -> dict:
    """A run name is a training mode, or `ssd_N`: mode ssd with sparse phases of N steps."""
    if mode.startswith("ssd_") and mode[4:].isdigit():
        return {"mode": "ssd", "sparse_steps": int(mode[4:])}
    return {"mode": mode}


def run_modes(root: Path, model: str, modes: list[str], settings: dict) -> None:
    for mode in modes:
        out = run_dir(root, model, mode)
        if finished_record(out) is not None:
            print(f"{model}/{mode}: already finished, reusing {out}")
            continue
        cfg = TrainConfig(model=model, activation="relu", out_dir=str(out), progress=False,
                          **{**settings, **mode_settings(mode)})
        resume = (out / "checkpoint.pt").exists()
        print(f"{model}/{mode}: training ({'resuming' if resume else 'from scratch'}) -> {out}")
        t0 = time.perf_counter()
        Trainer(cfg, resume=resume, overwrite=True).run()  # a run that died before its first checkpoint
        print(f"{model}/{mode}: done in {time.perf_counter() - t0:.0f} s")


def evals(log: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["time"], r["val_loss"]) for r in log if r["kind"] == "eval"]


def time_to_reach(log: list[dict], target: float) -> float | None:
    """First wall time at which the validation loss is <= target (linear interpolation)."""
    pts = [(t, v) for _, t, v in evals(log)]
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


def final_val(log: list[dict]) -> float:
    """The final validation loss of the model as the run trained it: sparse for the always-sparse
    ablation (its dense version after revert is reported separately), dense otherwise."""
    final = next(r for r in log if r["kind"] == "final")
    return final.get("val_loss_sparse", final.get("val_loss_dense"))


def plot_curves(root: Path, model: str, modes: list[str], out: Path, tag: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, idx, label in (("time", 1, "wall time (s)"), ("step", 0, "step")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for mode in modes:
            log = read_log(run_dir(root, model, mode))
            e = evals(log)
            (line,) = ax.plot([p[idx] for p in e], [p[2] for p in e], "o-", ms=3, label=mode)
            for a, b in sparse_spans(log, key):
                ax.axvspan(a, b, color=line.get_color(), alpha=0.08)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"{model}: validation loss (shaded: sparse phases)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"pretrain_{model}{tag}_loss_vs_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_findings(root: Path, model: str, out: Path, tag: str = "") -> list[Path]:
    """Sparsity and the stability metric over pre-training, from the dense run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = [r for r in read_log(run_dir(root, model, "dense")) if r["kind"] == "stability"]
    if not checks:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer in range(len(checks[0]["sparsity"])):
        axes[0].plot([c["step"] for c in checks], [c["sparsity"][layer] for c in checks], "o-", ms=2, label=f"layer {layer}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("activation sparsity (fraction of zeros)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    d = [(c["step"], c["mean_delta"]) for c in checks if c["mean_delta"] is not None]
    axes[1].plot([x for x, _ in d], [y for _, y in d], "o-", ms=3, label="coverage(fresh) - coverage(previous split)")
    axes[1].axhline(0.03, color="k", ls="--", lw=1, label="stability_tol")
    ari = [(c["step"], sum(c["ari"]) / len(c["ari"])) for c in checks if c["ari"][0] is not None]
    axes[1].plot([x for x, _ in ari], [y for _, y in ari], "s-", ms=3, label="mean ARI of consecutive splits")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{model} (ReLU), dense pre-training")
    fig.tight_layout()
    path = out / f"pretrain_{model}{tag}_findings.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def moe_inference(root: Path, model_name: str, settings: dict, reps: int = 7,
                  rounds: int = 3) -> list[dict]:
    """The SSD-trained model as an MoE at several k, against itself dense (one run, interleaved)."""
    from ssdfx.stats import observe
    from ssdfx.split import coactivation_split, kmeans_split

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from ssdfx.data import TokenData, load_corpus, make_tokenizer
    from ssdfx.hf import mlm_batch

    src = run_dir(root, model_name, "ssd")
    if not (src / "final_dense").is_dir():
        raise SystemExit(f"{src}/final_dense is missing: the repository keeps the runs' logs but not their "
                         f"weights. Retrain with `rm -r {src}` and run this again, or pass --no-inference.")
    cfg = TrainConfig(model=model_name, activation="relu", **settings)
    corpus = load_corpus(cfg.corpus)
    specials = 2 if model_name == "bert" else 0
    tok = make_tokenizer(cfg.tokenizer, corpus, specials, cfg.bpe_vocab)
    data = TokenData(corpus, tok)
    val = data.val_batches(cfg.batch_size, cfg.ctx, cfg.eval_batches)
    # routers are fitted on training text, never on the validation batches they are scored on
    fit = [data.batch("train", cfg.batch_size, cfg.ctx, seed=cfg.seed + 7, step=i) for i in range(2)]

    def inputs(b, i):
        if model_name == "gpt2":
            return {"input_ids": b[:, :-1], "labels": b[:, :-1]}
        v = tok.vocab_size
        return dict(zip(("input_ids", "labels"), mlm_batch(b[:, :-1], v - 2, v - 2, seed=cfg.seed, step=i)))

    batches = [inputs(b, i) for i, b in enumerate(val)]
    auto = AutoModelForCausalLM if model_name == "gpt2" else AutoModelForMaskedLM
    dense = auto.from_pretrained(src / "final_dense").eval()
    sites = ssdfx.find_ffns(dense)
    parts = {}  # one partition per (split, expert count), shared by every row that uses it
    stats = observe(dense, [inputs(b, i) for i, b in enumerate(fit)], sites=sites)
    ffn_inputs = {}
    hooks = [dense.get_submodule(s.path).register_forward_pre_hook(
        lambda m, a, p=s.path: ffn_inputs.setdefault(p, a[0])) for s in sites]
    dense(**batches[0])
    for h in hooks:
        h.remove()

    def val_loss(m):
        return sum(m(**b).loss.item() for b in batches) / len(batches)

    def ffn_time(m):
        return sum(_median_time(lambda: m.get_submodule(s.path)(ffn_inputs[s.path]), reps) for s in sites)

    e = cfg.num_experts
    base = val_loss(dense)
    rows = []
    # (E, k or max k, dynamic-k share, router): the training E at k/E = 1/8, 1/4, 1/2 and dynamic-k,
    # then finer experts (2E) at the same k/E, which the partition can be re-cut to at inference
    # and the co-activation split in place of k-means
    km, co = "kmeans", "coactivation"
    configs = [(km, e, e // 8, None, "centroid"), (km, e, e // 4, None, "centroid"),
               (km, e, e // 2, None, "centroid"), (km, e, e, 0.9, "centroid"), (km, e, e // 4, None, "mlp"),
               (km, e, e // 2, None, "mlp"), (km, e, e, 0.9, "mlp"), (km, e, e, 0.95, "mlp"),
               (km, 2 * e, e // 2, None, "mlp"), (km, 2 * e, 2 * e, 0.95, "mlp"),
               (co, e, e // 4, None, "mlp"), (co, e, e, 0.95, "mlp"), (co, e, e, 0.9, "mlp"),
               (co, e, e // 2, 0.9, "mlp"), (co, e, e, 0.875, "mlp"), (co, e, e, 0.85, "mlp"),
               (co, e, e, 0.8, "mlp"),
               (co, 2 * e, 2 * e, 0.9, "mlp")]
    for split, e, k, dyn, router in configs:
        if (split, e) not in parts:
            parts[split, e] = {s.name: (kmeans_split(s, dense, e) if split == km else
                                        coactivation_split(s, dense, e, stats=stats)) for s in sites}
        sparse = copy.deepcopy(dense)
        ssdfx.convert(sparse, e, k, sites=sites, partition=parts[split, e], dynamic_k=dyn, router=router,
                      stats=stats if (dyn or router == "mlp") else None)
        loss = val_loss(sparse)
        t_dense_f, t_sparse_f, t_dense_m, t_sparse_m = [], [], [], []
        for _ in range(rounds):  # interleave: the machine is shared and noisy
            t_dense_f.append(ffn_time(dense))
            t_sparse_f.append(ffn_time(sparse))
            t_dense_m.append(_median_time(lambda: dense(**batches[0]), reps))
            t_sparse_m.append(_median_time(lambda: sparse(**batches[0]), reps))
        mean_k = None
        if dyn:
            counts = []
            for s in sites:
                scores = sparse.get_submodule(s.path).ssdfx_router(ffn_inputs[s.path])
                idx, _ = ssdfx.routing.select_dynamic_k(scores, dyn, k)
                counts.append((idx >= 0).sum(-1).float().mean().item())
            mean_k = sum(counts) / len(counts)
        rows.append({
            "split": split, "k": k, "E": e, "router": router, "selection": f"dynamic-k {dyn} (max {k})" if dyn else f"top-{k}",
            "mean_k": mean_k if dyn else k,
            "val_loss": loss, "dense_val_loss": base, "loss_increase_pct": 100 * (loss / base - 1),
            "ffn_speedup": statistics.median(t_dense_f) / statistics.median(t_sparse_f),
            "ffn_speedup_per_round": [a / b for a, b in zip(t_dense_f, t_sparse_f)],
            "forward_speedup": statistics.median(t_dense_m) / statistics.median(t_sparse_m),
        })
        print(rows[-1])
    return rows


def summarize(root: Path, model: str, modes: list[str]) -> dict:
    logs = {m: read_log(run_dir(root, model, m)) for m in modes}
    finals = {m: next(r for r in l if r["kind"] == "final") for m, l in logs.items()}
    out = {"final_val_loss": {m: final_val(l) for m, l in logs.items()},
           "final_val_loss_dense": {m: f.get("val_loss_dense") for m, f in finals.items()},
           "final_val_loss_moe": {m: f.get("val_loss_moe", f.get("val_loss_sparse")) for m, f in finals.items()},
           "train_time_s": {m: f["time"] for m, f in finals.items()}}
    if "dense" in logs:
        target = out["final_val_loss"]["dense"] * 1.01
        out["target"] = target
        out["time_to_target_s"] = {m: time_to_reach(l, target) for m, l in logs.items()}
        dense_t = out["train_time_s"]["dense"]
        out["time_ratio_vs_dense"] = {m: (t / dense_t if t else None) for m, t in out["time_to_target_s"].items()}
        out["switches"] = {m: [r for r in l if r["kind"] == "switch"] for m, l in logs.items()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "bert"])
    ap.add_argument("--modes", default="dense,ssd,sparse",
                    help="comma-separated runs: dense, ssd, ssd-fixed, sparse, or ssd_N (ssd, N-step sparse phases)")
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    ap.add_argument("--out", default="bench/results", help="results root")
    ap.add_argument("--no-inference", action="store_true", help="skip the MoE inference measurements")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="override the number of training steps")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="MoE inference: interleaved dense/sparse timing rounds per setting (median)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes
           if mode_settings(m)["mode"] not in MODES or mode_settings(m).get("sparse_steps", 1) < 1]
    if bad:  # before the dense run trains
        ap.error(f"--modes: unknown {', '.join(map(repr, bad))}; give a comma-separated list of "
                 f"{', '.join(MODES)} or ssd_N (N >= 1)")
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    root = Path(args.out) / ("pretrain_quick" if args.quick else "pretrain")
    dense_cfg = dict(settings)
    run_modes(root, args.model, [m for m in modes if m == "dense"], dense_cfg)
    run_modes(root, args.model, [m for m in modes if m != "dense"], settings)
    tag = "_quick" if args.quick else ""  # a smoke run must not replace the real run's files
    plots = plot_curves(root, args.model, modes, Path(args.out), tag)
    plots += plot_findings(root, args.model, Path(args.out), tag) if "dense" in modes else []
    summary = summarize(root, args.model, modes)
    if "ssd" in modes and not args.no_inference:
        summary["moe_inference"] = moe_inference(root, args.model, settings, rounds=args.rounds)
    summary["settings"] = settings
    path = Path(args.out) / f"pretrain_{args.model}{tag}.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "switches"}, indent=1, default=str))
    print("plots:", *plots, sep="\n  ")


if __name__ == "__main__":
    main()
