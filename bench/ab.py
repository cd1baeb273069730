"""Two variants of the converted FFN alternated in one process: time ratio B / A per shape.

    python bench/ab.py --shapes 64x256x32x16 512x256x16x4 \\
        --b 'ssdfx.ops.cpu_numba:by_token_blocks=lambda *a: False'
    python bench/ab.py --shapes 512x256x16x4 --dtype bf16 --calls 61 \\
        --a 'ssdfx.ops.padded:MAX_PAD=2.0' --b 'ssdfx.ops.padded:MAX_PAD=1.5'

On these shared VMs separate processes of the same code drift by 20-50% between runs
(bench/README.md, twenty-fourth session), so an effect of a few percent needs both variants in
one process, alternated call by call. A variant is a set of attribute patches,
MODULE:ATTR=EXPR (EXPR is Python, evaluated once with torch and the module's own names in
scope, so that it may wrap what it replaces), set around each of its calls and undone after;
no patch is the code as it is. A patch reaches code that looks the attribute up at call time
(`module.attr`, or a global of that module), not a name another module imported from it.

    python bench/ab.py --dtype bf16 --shapes 512x256x16x4 --a 'ssdfx.ops.dispatch:_make=\
        lambda name: Kernels(name, _make(name).forward, _make(name).backward)'  # y of forward

Before each timed call a dense forward runs on fresh data, as a model's previous layer would
leave the caches; every call gets fresh input (routing included), the two variants alternate
which goes first, and warm-up calls of each come before the timed ones. Per shape and phase:
the medians, B / A of the medians, and the quartiles of the per-pair ratios, which the table
judges (B faster where the third quartile is below 1, slower where the first is above 1, else
undecided). Writes CSV (default bench/results/ab.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # op.py, when loaded from elsewhere

import torch  # noqa: E402

from op import (ROOT, dense_ffn, machine, shape_arg, sparse_model, steady_malloc,  # noqa: E402
                write_csv)
from ssdfx.cli import positive_int  # noqa: E402

_MISSING = object()


def patch_arg(text: str) -> tuple[object, str, object]:
    """argparse type: MODULE:ATTR=EXPR -> (module, attribute name, value); the module must
    import and have the attribute, and EXPR must evaluate."""
    target, sep, expr = text.partition("=")
    name, colon, attr = target.strip().partition(":")
    if not sep or not colon or not name or not attr.strip() or not expr.strip():
        raise argparse.ArgumentTypeError(
            f"expected MODULE:ATTR=EXPR, like 'ssdfx.ops.padded:MAX_PAD=1.5'; got {text!r}")
    attr = attr.strip()
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot import {name}: {e}") from None
    if not hasattr(module, attr):
        raise argparse.ArgumentTypeError(f"{text!r}: module {name} has no attribute {attr!r}")
    try:
        # the module's names (as they are now, before any patch) and torch are in scope, also
        # inside a lambda, which may so wrap the function it replaces
        value = eval(expr, {**vars(module), "torch": torch})
    except Exception as e:  # noqa: BLE001  (any error in the user's expression)
        raise argparse.ArgumentTypeError(f"{text!r}: {type(e).__name__}: {e}") from None
    return module, attr, value


@contextlib.contextmanager
def patched(patches):
    """Set each (module, attr, value) for the duration, then put back what was there."""
    saved = [(module, attr, vars(module).get(attr, _MISSING)) for module, attr, _ in patches]
    try:
        for module, attr, value in patches:
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(module, attr)
            else:
                setattr(module, attr, old)


def _quartiles(ratios: list[float]) -> tuple[float, float]:
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def measure(t, d, e, k, dtype, calls, variants, warmup=3):
    """Rows (one per phase) for one shape: variants {name: patches}, exactly two."""
    gen = torch.Generator().manual_seed(0)
    dense = dense_ffn(d, dtype)
    sparse = sparse_model(dense, e, k)
    params = list(sparse.parameters())
    x = torch.empty(t, d, dtype=dtype)
    xg = torch.empty(t, d, dtype=dtype).requires_grad_()
    dy = torch.empty(t, d, dtype=dtype)

    def run(name, phase):
        with torch.no_grad():
            dense(x.normal_(generator=gen))  # the previous layer
        with patched(variants[name]):
            if phase == "fwd":
                x.normal_(generator=gen)
                start = time.perf_counter()
                with torch.no_grad():
                    sparse(x)
                return time.perf_counter() - start
            with torch.no_grad():
                xg.normal_(generator=gen)
            dy.normal_(generator=gen)
            xg.grad = None
            for p in params:
                p.grad = None
            start = time.perf_counter()
            sparse(xg).backward(dy)
            return time.perf_counter() - start

    a, b = variants
    phases = ("fwd", "fwd+bwd")
    for name in (a, b):
        for phase in phases:
            for _ in range(warmup):
                run(name, phase)
    times = {(name, phase): [] for name in (a, b) for phase in phases}
    for i in range(calls):
        for phase in phases:
            for name in ((a, b) if i % 2 == 0 else (b, a)):
                times[(name, phase)].append(run(name, phase))
    rows = []
    for phase in phases:
        ta, tb = times[(a, phase)], times[(b, phase)]
        q1, q3 = _quartiles([y / x for x, y in zip(ta, tb)])
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append(dict(dtype=str(dtype).removeprefix("torch."), T=t, d=d, E=e, k=k,
                         phase=phase, a=a, b=b, a_ms=round(ma * 1e3, 3),
                         b_ms=round(mb * 1e3, 3), b_over_a=round(mb / ma, 3),
                         ratio_q1=round(q1, 3), ratio_q3=round(q3, 3), calls=calls))
    return rows


def verdict(row) -> str:
    if row["ratio_q3"] < 1:
        return f"{row['b']} faster"
    if row["ratio_q1"] > 1:
        return f"{row['b']} slower"
    return "undecided"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", type=shape_arg, metavar="TxDxExK", required=True,
                    help="the converted FFN's shapes, e.g. 64x256x16x4")
    ap.add_argument("--a", action="append", type=patch_arg, default=[], metavar="MODULE:ATTR=EXPR",
                    help="a patch of variant A (repeat for more; none: the code as it is)")
    ap.add_argument("--b", action="append", type=patch_arg, default=[], metavar="MODULE:ATTR=EXPR",
                    help="a patch of variant B (repeat for more; none: the code as it is)")
    ap.add_argument("--names", default="A,B", metavar="A,B",
                    help="the two variants' names in the table and CSV (default A,B)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--calls", type=positive_int, default=41,
                    help="timed calls of each variant per shape and phase (default 41)")
    ap.add_argument("--warmup", type=positive_int, default=3, metavar="N",
                    help="untimed calls of each variant per phase first (default 3)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab.csv")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        ap.error(f"--names: expected two different names like A,B; got {args.names!r}")
    if not args.a and not args.b:
        ap.error("give --a or --b patches: with neither, both variants are the same code")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    steady = steady_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine()}, malloc "
          f"{'steady' if steady else 'default'}", flush=True)
    for name, patches in zip(names, (args.a, args.b)):
        print(f"{name}: " + ("; ".join(f"{m.__name__}.{attr} = {v!r}" for m, attr, v in patches)
                             or "the code as it is"), flush=True)
    variants = dict(zip(names, (args.a, args.b)))
    rows = []
    for t, d, e, k in args.shapes:
        new = measure(t, d, e, k, dtype, args.calls, variants, args.warmup)
        for r in new:
            print(" ".join(f"{c}={r[c]}" for c in r), flush=True)
        rows += new
    write_csv(rows, args.out)
    cols = ["dtype", "T", "d", "E", "k", "phase", "a_ms", "b_ms", "b_over_a", "ratio_q1",
            "ratio_q3"]
    print("| " + " | ".join(cols) + " | verdict |")
    print("|" + "---:|" * (len(cols) + 1))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + f" | {verdict(r)} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
