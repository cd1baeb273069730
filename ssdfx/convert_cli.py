"""`ssdfx convert` and `ssdfx bench`: build a MODEL, convert it, and save or time it.

Registered by `ssdfx.cli.build_parser`; the shared MODEL options and helpers live in
`ssdfx.cli`.
"""

from __future__ import annotations

import argparse

from pathlib import Path

from ssdfx.cli import (UsageError, _build, _convert, _emit, _expert_group, _model_command,
                       positive_int)

__all__ = ["add_bench", "add_convert"]


# -- bench ----------------------------------------------------------------------------------------


def _pass_arg(text: str) -> tuple[int, int]:
    e, sep, k = text.partition(":")
    if not sep or not e.isdigit() or not k.isdigit():
        raise argparse.ArgumentTypeError(f"expected E:K such as 16:4, got {text!r}")
    if not 1 <= int(k) <= int(e):
        raise argparse.ArgumentTypeError(f"{text}: need 1 <= K <= E (K experts per token out of "
                                         "E), e.g. 16:4")
    return int(e), int(k)


def _share(text: str) -> float:
    """argparse type of --dynamic-k: the bounds convert checks (`validate_dynamic_k`)."""
    from ssdfx.passes.moefy import validate_dynamic_k

    try:
        value = float(text)
        validate_dynamic_k(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] such as 0.9, got {text!r}") from None
    return value


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from ssdfx.benchmark import time_passes
    from ssdfx.tables import render, si

    passes = args.passes or [(args.num_experts, args.top_k)]
    built = _build(args, extra)
    rows = time_passes(built.model, built.args, built.kwargs, passes, repeats=args.repeats,
                       partition=args.partition, backward=args.backward)
    what = "forward+backward" if args.backward else "forward"
    if args.json:
        _emit({"model": built.description, "timed": what, "repeats": args.repeats,
               "rows": [r.as_dict() for r in rows]})
        return 0
    print(built.description)
    print(f"{what} ({'eval mode' if args.backward else 'eval, no grad'}), {args.repeats} "
          f"interleaved rounds, medians; {torch.get_num_threads()} threads")
    body = [["dense" if r.E is None else "moefy", r.E, r.k, si(r.flops), f"{r.ratio:.3f}",
             f"{r.ffn_ratio:.3f}", f"{r.ms:.2f}", f"{r.time_ratio:.3f}"] for r in rows]
    print(render(["pass", "E", "k", "forward FLOPs", "ratio", "FFN ratio", f"{what} ms",
                  "time ratio"], body, left=2))
    return 0


def add_bench(sub) -> None:
    p = _model_command(
        sub, "bench", help="forward time and FLOPs, dense against converted",
        description="Time the model's forward pass dense and after convert (one copy per "
                    "E:K pass), interleaved rounds and medians so the ratio is measured under "
                    "one machine load, next to the FLOP ratio. For the sparse operator alone see "
                    "bench/op.py in the repository.", device="cpu", meta=False)
    g = _expert_group(p, "contiguous", ["contiguous", "random", "kmeans"],
                      partition_note="; the time does not depend on it")
    g.add_argument("--pass", dest="passes", type=_pass_arg, action="append", metavar="E:K",
                   help="time this conversion; repeatable (replaces -E/-k), e.g. --pass 8:2 "
                        "--pass 16:4")
    g = p.add_argument_group("timing and output")
    g.add_argument("--repeats", type=positive_int, default=7, metavar="N",
                   help="timed rounds (default: 7)")
    g.add_argument("--backward", action="store_true",
                   help="time forward + backward of a loss instead of the forward alone: the "
                        "mean square of the model's output (for HF models the logits; no labels "
                        "are passed), or the model's own .loss when a factory's example inputs "
                        "make it return one")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench)


# -- convert --------------------------------------------------------------------------------------


def _convert_cmd(args: argparse.Namespace, extra: list[str]) -> int:
    import ssdfx
    from ssdfx.saving import check_target, save_converted

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a new or empty directory")
    check_target(args.out, args.overwrite)  # before the model is built and converted
    built = _build(args, extra)
    stats = None
    if args.router == "mlp" or args.partition == "coactivation" or args.dynamic_k is not None:
        # fitted on activation statistics of the example batch (--batch, --seq-len)
        stats = ssdfx.observe(built.model, [built.args] if built.args else [built.kwargs])
    _convert(args, built, router=args.router, dynamic_k=args.dynamic_k, stats=stats)
    out = save_converted(built.model, args.out, overwrite=args.overwrite)
    print(built.description)
    print(ssdfx.conversion(built.model))
    print(f"wrote {out} (load it with ssdfx.load_converted)")
    return 0


def add_convert(sub) -> None:
    p = _model_command(
        sub, "convert", help="convert a model's FFNs to routed experts and save it",
        description="Build the model, convert every FFN to router + routed experts, and save "
                    "the result (weights, neuron splits, routers) to a directory that "
                    "ssdfx.load_converted(DIR) rebuilds. MODEL can also be a directory written by "
                    "save_pretrained (e.g. a training run's final_dense/).", device="cpu",
        meta=False)
    g = _expert_group(p, "kmeans", ["contiguous", "random", "kmeans", "coactivation"],
                      partition_note="; coactivation records activation statistics on the "
                                     "example batch first",
                      top_k_note=", or the cap with --dynamic-k")
    g.add_argument("--router", default="centroid", choices=["centroid", "mlp"],
                   help="router kind (default: centroid; mlp is fitted on the example batch)")
    g.add_argument("--dynamic-k", type=_share, metavar="SHARE",
                   help="per token, the fewest experts whose predicted activation mass reaches "
                        "SHARE (e.g. 0.9), at most --top-k")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="where to save the converted model: a new or empty directory, or an "
                        "earlier `ssdfx convert --out` directory with --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the converted model saved in DIR (its config.json, "
                        "model.safetensors and ssdfx.json; other files are kept, and a "
                        "directory holding anything but an ssdfx save is still refused)")
    p.set_defaults(func=_convert_cmd)
