"""The `ssdfx` command line.

    ssdfx train                                  # the main job: SSD pre-training on Shakespeare
    ssdfx plot runs/ssd                          # PNG plots of a run
    ssdfx demo                                   # the convert/revert tour on a small GPT-2
    ssdfx convert gpt2 --n-layer 2 -E 8 -k 2 --out moe/   # convert and save (load_converted)
    ssdfx flops gpt2 --n-layer 2                 # FLOPs per site, dense and after convert
    ssdfx bench gpt2 --n-layer 2 --pass 8:2 --pass 16:4   # forward time, dense vs converted
    ssdfx flops llama --device meta --json       # full-size config, shapes only
    ssdfx inspect bert --n-layer 2 --site 0      # site table, one site before/after, node diff
    ssdfx inspect tests/models.py:llama --draw graphs/

Each subcommand has one `_add_<name>(subparsers)` function that declares its options and sets
`func`, registered in `build_parser` (train and plot live in train_cli.py, convert and bench in
convert_cli.py); a subcommand that takes a MODEL starts from `_model_command` (its parser
with `_add_model_args`: MODEL and its config settings; `func` then gets `(args, extra)` and
builds with `_build(args, extra)`), and the conversion options come from `_expert_group`.
Exit status: 0 on success, 1 when the model cannot be built, converted or captured (the
message says why, on stderr; --traceback shows the trace), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad command line: exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


# -- demo --------------------------------------------------------------------------------------


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


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="convert a small GPT-2 and show the rewritten graph",
                          description="Build a small GPT-2 from a config, find its FFNs, show one "
                                      "site's graph before and after convert, and check exactness.")
    demo.add_argument("--n-layer", type=int, default=4, help="transformer layers (default: 4)")
    demo.add_argument("--n-embd", type=int, default=128, help="model width d_model (default: 128)")
    demo.add_argument("--num-experts", type=int, default=8, help="experts per FFN (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)


# -- shared option groups ----------------------------------------------------------------------

_MODEL_HELP = """\
MODEL is an HF model type (gpt2, bert, llama, t5, opt, ...), built from transformers' default
config for that type with random weights (nothing is downloaded), a directory written by
save_pretrained (loaded with its weights, e.g. a training run's final_dense/), or a Python
factory MODULE:FUNCTION or FILE.py:FUNCTION returning a module or (module, example kwargs).
Config settings: --n-layer/--d-model/--d-ff/--n-head/--vocab-size map to each family's own
key; any other config key works as --KEY VALUE (e.g. --n-embd 256) or --set KEY=VALUE.
For a factory, every such setting (--n-layer 2, --set NAME=VALUE, --NAME VALUE) is passed
to it as a keyword argument (n_layer=2, NAME=VALUE)."""


def _model_command(sub, name: str, help: str, description: str,
                   device: str, meta: bool = True) -> argparse.ArgumentParser:
    """A subcommand that takes a MODEL: its parser, with the model options and their epilog.
    meta=False for commands that need real weights (no --device meta)."""
    p = sub.add_parser(name, help=help, description=description, epilog=_MODEL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, device, meta)
    return p


def _add_model_args(p: argparse.ArgumentParser, device: str, meta: bool = True) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="HF model type, saved model directory, or MODULE:FACTORY (see below)")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, metavar="N", help="transformer layers")
    g.add_argument("--d-model", type=int, metavar="D", help="model width (hidden size)")
    g.add_argument("--d-ff", type=int, metavar="F", help="FFN width (intermediate size)")
    g.add_argument("--n-head", type=int, metavar="H", help="attention heads")
    g.add_argument("--vocab-size", type=int, metavar="V", help="vocabulary size")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key (HF) or factory argument; repeatable; VALUE is a Python "
                        "literal or a string")
    g.add_argument("--head", default="auto",
                   choices=["auto", "seq2seq-lm", "masked-lm", "causal-lm", "base"],
                   help="which HF model class (default: auto = seq2seq LM, else masked LM, else "
                        "causal LM, else the base model)")
    g.add_argument("--batch", type=int, default=1, metavar="B",
                   help="example batch size for HF models (default: 1)")
    g.add_argument("--seq-len", type=int, metavar="S",
                   help="example sequence length for HF models (default: 128, or the model's "
                        "positions if fewer)")
    if meta:
        g.add_argument("--device", choices=["cpu", "meta"], default=device,
                       help=f"cpu: real random weights; meta: shapes only, no memory (full-size "
                            f"configs in seconds; nothing can run) (default: {device})")
    else:
        g.add_argument("--device", choices=["cpu"], default=device,
                       help="cpu, the only choice here: this command needs real weights")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(config_flags=True)


def _expert_group(p: argparse.ArgumentParser, partition: str, partitions: list[str],
                  partition_note: str = "", top_k_note: str = ""):
    """The "conversion" option group: -E, -k and --partition (callers add their own)."""
    g = p.add_argument_group("conversion")
    g.add_argument("--num-experts", "-E", type=positive_int, default=8, metavar="E",
                   help="experts per FFN (default: 8)")
    g.add_argument("--top-k", "-k", type=positive_int, default=2, metavar="K",
                   help=f"experts per token{top_k_note} (default: 2)")
    g.add_argument("--partition", default=partition, choices=partitions,
                   help=f"how neurons are split into experts (default: {partition}"
                        f"{partition_note})")
    return g


def _add_convert_args(p: argparse.ArgumentParser, what: str) -> None:
    g = _expert_group(p, "contiguous", ["contiguous", "random", "kmeans"])
    g.add_argument("--dense", action="store_true", help=f"do not convert: {what}")


def _parse_extra(extra: list[str]) -> dict:
    """Unknown `--key value` / `--key=value` options -> {key: value} (dashes to underscores)."""
    from ssdfx.modelspec import parse_value

    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or tok == "--":
            raise UsageError(f"unexpected argument {tok!r}")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = "True"
        out[key.replace("-", "_")] = parse_value(value)
        i += 1
    return out


def _spec(args: argparse.Namespace, extra: list[str]):
    from ssdfx.modelspec import ModelSpec, parse_value

    overrides = _parse_extra(extra)
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = parse_value(value.strip())
    aliases = {k: getattr(args, k) for k in ("n_layer", "d_model", "d_ff", "n_head", "vocab_size")
               if getattr(args, k) is not None}
    if ":" in args.model:  # a factory: the generic flags are its keyword arguments
        overrides.update({k: v for k, v in aliases.items()})
        aliases = {}
    return ModelSpec(args.model, overrides, aliases, args.head, args.batch, args.seq_len,
                     args.seed, args.device)


def _build(args, extra):
    from ssdfx.modelspec import build

    return build(_spec(args, extra))


def _convert(args, built, **options) -> None:
    """Convert built.model with the -E/-k/--partition options (and convert's other `options`)."""
    import ssdfx

    if args.device == "meta" and args.partition == "kmeans":
        raise UsageError("--partition kmeans clusters the weights, which --device meta does not "
                         "have: use --device cpu (FLOPs do not depend on the partition)")
    ssdfx.convert(built.model, num_experts=args.num_experts, top_k=args.top_k,
                  partition=args.partition, example_inputs=built.args or None,
                  example_kwargs=built.kwargs or None, **options)


def _emit(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- flops ----------------------------------------------------------------------------------------


def _flops(args: argparse.Namespace, extra: list[str]) -> int:
    from ssdfx.flopcount import count_flops, counter_flops

    if args.check and args.device == "meta":
        raise UsageError("--check runs the model under FlopCounterMode: use --device cpu")
    built = _build(args, extra)
    if not args.dense:
        _convert(args, built)
    table = count_flops(built.model, built.args, built.kwargs)
    check = None
    if args.check:
        ref = counter_flops(built.model, *built.args, **built.kwargs)
        check = {"flop_counter_mode": ref, "ssdfx": table.total,
                 "relative_difference": (table.total - ref) / ref if ref else None}
    if args.csv:
        table.to_csv(args.csv)
    if args.json:
        _emit({"model": built.description, "stages": list(table.stages), "config": table.config,
               "rows": table.to_dicts(), "totals": table.totals, "total": table.total,
               "by_op": dict(table.by_op), "notes": list(table.notes), "check": check})
        return 0
    print(built.description)
    print(table)
    if check:
        diff = check["relative_difference"]
        print(f"FlopCounterMode: {check['flop_counter_mode']:,} FLOPs; ssdfx: {table.total:,} "
              f"({'n/a' if diff is None else f'{diff:+.3%}'})")
    if args.csv:
        print(f"wrote {args.csv}")
    return 0


def _add_flops(sub) -> None:
    p = _model_command(
        sub, "flops", help="forward FLOPs per FFN site and in total, dense and converted",
        description="Count forward FLOPs (2 per multiply-add, matrix products only, from the "
                    "shapes torch.export records) per FFN site and in total: dense, and after "
                    "convert at the given E and k.", device="meta")
    _add_convert_args(p, "dense figures only")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--csv", metavar="FILE", help="also write the table as CSV to FILE")
    g.add_argument("--check", action="store_true",
                   help="also run torch's FlopCounterMode on the model and compare (needs --device cpu)")
    p.set_defaults(func=_flops)


# -- inspect --------------------------------------------------------------------------------------


def _site_arg(text: str | None):
    if text is None:
        return 0
    return int(text) if text.lstrip("-").isdigit() else text


def _inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from ssdfx import debug
    from ssdfx.errors import NoFFNFoundError

    built = _build(args, extra)
    ex = (built.args or None, built.kwargs or None)
    dense_table = debug.site_table(built.model, *ex)
    if not dense_table.rows:
        raise NoFFNFoundError(f"no FFN site found in {type(built.model).__name__}")
    site = debug.resolve_site(built.model, _site_arg(args.site), *ex)
    if not args.dense:
        _convert(args, built)
    table = debug.site_table(built.model, *ex) if not args.dense else dense_table
    graphs = debug.site_graphs(built.model, site)
    diff = debug.node_diff(built.model, site)
    drawn = []
    if args.draw:
        drawn = debug.draw_site(built.model, site, args.draw, args.format)
        if args.format is None and not debug.graphviz_available():
            print("ssdfx inspect: note: graphviz's `dot` is not installed, so only .dot files "
                  "were written (install graphviz for SVG, or pass --format dot)", file=sys.stderr)
    if args.json:
        _emit({"model": built.description, "sites": table.to_dicts(), "site": site.path,
               "graphs": [{"path": g.path, "before": debug.code_of(g.before),
                           "after": debug.code_of(g.after) if g.after is not None else None}
                          for g in graphs],
               "node_diff": diff.to_dicts(), "drawings": drawn})
        return 0
    print(built.description)
    print(f"\nFFN sites{'' if args.dense else ' after convert'}:")
    print(table)
    print(f"\nsite {site.path}:\n")
    print(debug.listing(built.model, site))
    print("\nnodes per op:")
    print(diff)
    for path in drawn:
        print(f"wrote {path}")
    return 0


def _add_inspect(sub) -> None:
    p = _model_command(
        sub, "inspect", help="site table, one site's graph before/after, node counts, drawings",
        description="Find the model's FFN sites, convert them, and show the site table, one "
                    "site's generated code before and after, and the node count per op.",
        device="cpu")
    _add_convert_args(p, "show the dense sites and graphs only")
    g = p.add_argument_group("output")
    g.add_argument("--site", metavar="SITE",
                   help="which site to show: index in the site table, module path or input-weight "
                        "name (default: 0)")
    g.add_argument("--draw", metavar="DIR",
                   help="write DOT drawings of the site before/after to DIR (and SVG when "
                        "graphviz is installed)")
    g.add_argument("--format", choices=["dot", "svg", "png", "pdf"],
                   help="drawing format; svg/png/pdf need graphviz's dot (default: svg when "
                        "installed, else dot)")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_inspect)


# -- entry point ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssdfx",
        description="Switchable Sparse-Dense Learning for PyTorch Transformers, as fx graph rewrites.")
    traceback_help = "show the full traceback on errors (for bug reports)"
    parser.add_argument("--traceback", action="store_true", help=traceback_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from ssdfx.convert_cli import add_bench, add_convert
    from ssdfx.train_cli import add_plot, add_train

    add_train(sub)
    add_plot(sub)
    _add_demo(sub)
    add_convert(sub)
    _add_inspect(sub)
    _add_flops(sub)
    add_bench(sub)
    for command in sub.choices.values():  # also after the subcommand, where users put options
        # SUPPRESS: when it is not given here, the top-level value (default False) stays
        command.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=traceback_help)
        command.set_defaults(subparser=command)  # for its own usage line in errors
    return parser


def _check_expert_args(args: argparse.Namespace) -> None:
    """UsageError for -k above -E, before anything is built (--pass, when given, replaces both
    and checks itself)."""
    if not getattr(args, "config_flags", False) or getattr(args, "passes", None):
        return  # not a MODEL command (train checks its own settings)
    if args.top_k > args.num_experts:
        raise UsageError(f"-k/--top-k {args.top_k} exceeds -E/--num-experts {args.num_experts}: "
                         "each token picks K of the E experts")


def main(argv: list[str] | None = None) -> int:
    from ssdfx.errors import SSDFXError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if extra and not getattr(args, "config_flags", False):
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"ssdfx {args.command}"
    try:
        _check_expert_args(args)
        return args.func(args, extra) if getattr(args, "config_flags", False) else args.func(args)
    except UsageError as e:
        if args.traceback:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (SSDFXError, ValueError, TypeError, KeyError, IndexError, ImportError, OSError) as e:
        if args.traceback:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.strerror and e.filename:  # not "[Errno 2] ..."
            msg = f"{e.filename}: {e.strerror}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
