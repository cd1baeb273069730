"""The `ssdfx` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    import ssdfx
    from ssdfx.capture import trace

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, vocab_size=256,
                     n_positions=128, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 256, (2, 64))
    print(f"GPT-2 from a config: {args.n_layer} layers, d_model={args.n_embd}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters\n")

    t0 = time.perf_counter()
    sites = ssdfx.find_ffns(model)
    print(f"FFN sites found by graph structure ({time.perf_counter() - t0:.2f} s):")
    print(f"  {'path':<24} {'kind':<6} {'d_model':>7} {'d_ff':>6}  {'activation':<10} scope")
    for s in sites:
        print(f"  {s.path:<24} {s.kind:<6} {s.d_model:>7} {s.d_ff:>6}  {s.activation:<10} {s.scope.kind}")

    first = model.get_submodule(sites[0].path)
    print(f"\n--- {sites[0].path}, before (fx trace of {type(first).__name__}) ---")
    print(trace(first).code.strip())

    with torch.no_grad():
        dense = model(ids).logits
    e = args.num_experts
    ssdfx.convert(model, num_experts=e, top_k=e, sites=sites)
    print(f"\n--- {sites[0].path}, after ssdfx.convert(num_experts={e}, top_k={e}) ---")
    print(model.get_submodule(sites[0].path).code.strip())
    with torch.no_grad():
        err = (model(ids).logits - dense).abs().max().item()
    print(f"\nk == E: max |logits - dense logits| = {err:.2e} (the conversion is exact)")
    ssdfx.revert(model)

    k = max(1, e // 4)
    ssdfx.convert(model, num_experts=e, top_k=k, sites=sites, partition="random")
    with torch.no_grad():
        err_k = (model(ids).logits - dense).abs().max().item()
    print(f"k == E/4 = {k}: max |logits - dense logits| = {err_k:.2e} "
          "(random weights: routing is not trained yet)")
    ssdfx.revert(model)
    with torch.no_grad():
        back = (model(ids).logits - dense).abs().max().item()
    print(f"after ssdfx.revert: max |logits - dense logits| = {back:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssdfx",
        description="Switchable Sparse-Dense Learning for PyTorch Transformers, as fx graph rewrites.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="convert a small GPT-2 and show the rewritten graph",
                          description="Build a small GPT-2 from a config, find its FFNs, show one "
                                      "site's graph before and after convert, and check exactness.")
    demo.add_argument("--n-layer", type=int, default=4, help="transformer layers (default: 4)")
    demo.add_argument("--n-embd", type=int, default=128, help="model width d_model (default: 128)")
    demo.add_argument("--num-experts", type=int, default=8, help="experts per FFN (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
