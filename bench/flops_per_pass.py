"""FLOPs per pass and the forward time they buy: model x pass -> dense FLOPs, sparse FLOPs, their
ratio, and the measured forward-time ratio on this CPU.

    python bench/flops_per_pass.py [--quick] [--repeats N] [--seq-len S] [--batch B] [--out CSV]

Each model is an HF config with random weights (built by ssdfx.modelspec, as `ssdfx flops`
builds it). For every pass setting, a copy of the dense model is converted; the FLOPs come from
`ssdfx.flops` (analytic, cross-checked against FlopCounterMode in tests/test_flops.py). Times:
dense and converted forwards (eval, no_grad) are interleaved and each figure is a median, so
the ratio is measured under the same machine load: `time_ratio` is the median over rounds of
sparse/dense forward time within the round (robust to load that changes between rounds; the
cores are shared). `ffn_ratio` is the FFN sites' sparse/dense FLOPs (router included), `ratio`
the whole model's; `gflops` = FLOPs / median forward time (a low dense figure means the machine
was busy during that model).
Prints a table and writes CSV (default bench/results/flops_per_pass.csv).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ssdfx.benchmark import time_passes  # noqa: E402
from ssdfx.cli import positive_int  # noqa: E402
from ssdfx.modelspec import ModelSpec, build  # noqa: E402
from ssdfx.tables import render, si  # noqa: E402

# width 512, FFN 2048 (GLU: 1376 ~ 2/3 * 2048 * 4/3 rounded to a multiple of 32), 4 layers
MODELS = {
    "gpt2": ({"n_layer": 4, "d_model": 512, "n_head": 8, "vocab_size": 2048}, {}),
    "bert": ({"n_layer": 4, "d_model": 512, "n_head": 8, "d_ff": 2048, "vocab_size": 2048}, {}),
    "t5": ({"n_layer": 2, "d_model": 512, "n_head": 8, "d_ff": 2048, "vocab_size": 2048},
           {"d_kv": 64}),
    "llama": ({"n_layer": 4, "d_model": 512, "n_head": 8, "d_ff": 1376, "vocab_size": 2048},
              {"num_key_value_heads": 8}),
    "opt": ({"n_layer": 4, "d_model": 512, "n_head": 8, "d_ff": 2048, "vocab_size": 2048},
            {"word_embed_proj_dim": 512}),
}
PASSES = [(8, 2), (8, 1), (16, 4), (32, 4)]  # moefy (E, k)
QUICK_MODELS, QUICK_PASSES = ["gpt2", "llama"], [(8, 2), (16, 4)]


def bench_model(name: str, passes, repeats: int, seq_len: int, batch: int) -> list[dict]:
    aliases, overrides = MODELS[name]
    built = build(ModelSpec(name, overrides, aliases, batch=batch, seq_len=seq_len))
    rows = time_passes(built.model, built.args, built.kwargs, passes, repeats=repeats)
    return [dict(model=name, pass_="dense" if r.E is None else "moefy", E=r.E, k=r.k,
                 tokens=batch * seq_len, dense_flops=r.dense_flops, sparse_flops=r.flops,
                 ratio=r.ratio, ffn_ratio=r.ffn_ratio, ms=r.ms,
                 gflops=r.flops / r.ms / 1e6, time_ratio=r.time_ratio) for r in rows]


def positions(name: str) -> int | None:
    """How many positions the model's config has (None: no limit, e.g. T5's relative ones)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(name, **MODELS[name][1])
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return limit if isinstance(limit, int) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {QUICK_MODELS} x {QUICK_PASSES}")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="models to run (default: all)")
    p.add_argument("--repeats", type=positive_int, default=7,
                   help="timed forwards per model (default: 7)")
    p.add_argument("--seq-len", type=positive_int, default=256,
                   help="tokens per sequence, at most the models' positions (default: 256)")
    p.add_argument("--batch", type=positive_int, default=4,
                   help="sequences per batch (default: 4)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flops_per_pass.csv"))
    a = p.parse_args(argv)
    names = a.models or (QUICK_MODELS if a.quick else list(MODELS))
    passes = QUICK_PASSES if a.quick else PASSES
    for name in names:  # before any model is timed
        limit = positions(name)
        if limit is not None and a.seq_len > limit:
            p.error(f"--seq-len {a.seq_len} exceeds {name}'s {limit} positions; pass "
                    f"--seq-len {limit} or less (or leave {name} out with --models)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{a.batch} x {a.seq_len} tokens, {a.repeats} interleaved repeats, medians")
    rows = []
    for name in names:
        rows += bench_model(name, passes, a.repeats, a.seq_len, a.batch)
        print(f"  {name} done", flush=True)
    headers = ["model", "pass", "E", "k", "dense FLOPs", "sparse FLOPs", "ratio", "FFN ratio",
               "forward ms", "GFLOP/s", "time ratio"]
    body = [[r["model"], r["pass_"], r["E"], r["k"], si(r["dense_flops"]), si(r["sparse_flops"]),
             f"{r['ratio']:.3f}", f"{r['ffn_ratio']:.3f}", f"{r['ms']:.1f}", f"{r['gflops']:.0f}",
             f"{r['time_ratio']:.3f}"] for r in rows]
    print(render(headers, body, left=2))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k.rstrip("_") for k in rows[0]], lineterminator="\n")
        w.writeheader()
        w.writerows([{k.rstrip("_"): v for k, v in r.items()} for r in rows])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
