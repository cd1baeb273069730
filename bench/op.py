"""Dense FFN vs the sparse routed-expert op on CPU: forward and forward+backward speedups.

    python bench/op.py [--quick] [--dtype fp32|bf16|both] [--repeats N] [--out CSV]
    python bench/op.py --router-share    # routing's share of the sparse forward, d=768
    python bench/op.py --shapes 64x256x16x4 256x768x16x4    # chosen T x d x E x k

The dense model is Linear(d, 4d) -> GELU -> Linear(4d, d). The sparse model is the same module
after `ssdfx.convert(ffn, num_experts=E, top_k=k)` (router included: centroid scores, top-k,
straight-through gate).
Dense and sparse runs are interleaved and each figure is a median, so the ratio is measured
under the same machine load. `ideal` is E/k (the FLOP ratio); `of_ideal` = speedup / ideal;
`speedup_q1`, `speedup_q3` the quartiles of the speedup measured within each repeat, and the
last lines judge the k = E/2 shapes by them (not slower than dense, undecided, slower), then
SPEC section 6's CPU targets by the median speedups.
Prints a markdown table and writes CSV (default bench/results/op.csv for the fp32 sweep;
op_bf16.csv, op_quick.csv, ... for the others).
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import ssdfx  # noqa: E402
from ssdfx.cli import positive_int  # noqa: E402
from ssdfx.ops.dispatch import native_gemm  # noqa: E402

FULL = dict(T=[512, 2048, 8192], d=[256, 768], E=[8, 16, 32], k_frac=[1 / 8, 1 / 4, 1 / 2])
QUICK = [(2048, 768, 16, 4), (2048, 768, 16, 8), (2048, 768, 8, 1), (512, 256, 16, 4)]
# --small: the SPEC's "never slower than dense from T=64" below the sweep's smallest T, with the
# sweep's d, E and k/E
SMALL_T = [64, 128, 256]
INPUTS = 4  # distinct input batches cycled by router_share (measure writes fresh ones)


def dense_ffn(d: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The dense baseline: Linear(d, 4d) -> GELU -> Linear(4d, d), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)).to(dtype)


def sparse_model(dense: nn.Sequential, num_experts: int, k: int) -> nn.Module:
    return ssdfx.convert(copy.deepcopy(dense), num_experts=num_experts, top_k=k)


def _cpu_times() -> tuple[int, int, int]:
    """(total, idle, steal) CPU time of the whole machine so far, in jiffies (Linux
    /proc/stat; zeros elsewhere). Steal is time the hypervisor gave this VM's CPUs to others."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0, 0
    return sum(vals), vals[3] + vals[4], vals[7] if len(vals) > 7 else 0


def _cpu_idle_share(seconds: float = 0.3) -> float:
    """Share of CPU time idle over `seconds` (1.0 where /proc/stat is missing)."""
    t0, i0, _ = _cpu_times()
    time.sleep(seconds)
    t1, i1, _ = _cpu_times()
    return (i1 - i0) / (t1 - t0) if t1 > t0 else 1.0


def _steal_share(seconds: float = 0.2) -> float:
    """Share of CPU time stolen by the hypervisor while both threads multiply matrices for
    `seconds`: steal only shows while the VM runs, so an idle check alone cannot see a busy
    host."""
    a = torch.randn(256, 256)
    t0, _, s0 = _cpu_times()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
    t1, _, s1 = _cpu_times()
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def wait_idle(max_wait: float, share: float = 0.9, max_steal: float = 0.03) -> bool:
    """Wait (up to max_wait s) until the machine is idle and the host gives it whole CPUs
    (steal below max_steal), so other jobs, here or on the host, do not skew a run."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        if _cpu_idle_share() >= share and _steal_share() <= max_steal:
            return True
    return False


def _minor_faults() -> int:
    """Page faults of this process so far that needed no disk (0 where unsupported)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn) -> tuple[float, int]:
    """fn's wall time in ms and the page faults it took (each ~1 us on these VMs)."""
    f0 = _minor_faults()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    return (t1 - t0) * 1e3, _minor_faults() - f0


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def steady_malloc() -> bool:
    """Make glibc keep freed memory in its heap for reuse (one arena, no mmap'd chunks, no
    trimming), as a caching allocator would; False where glibc is not the allocator.

    glibc's default thresholds move with the process's allocation history: alternating the
    dense and the converted FFN at T=2048, d=768, E=16, k=4 (AMD Zen 5), some runs mapped the
    dense FFN's 25 MB hidden units fresh on every call (~10,000 page faults, 62-70 ms) and
    others reused them (no faults, 49-52 ms), depending on the other model's allocations, so a
    ratio measured there compared two allocator states; requests of 32 MiB or more (dense at
    T=8192: 100 MB hidden units) were mapped fresh on every call. Steady, the full sweep ran
    with no faults in either model; it is not a guarantee: torch's aligned allocations can
    leave a freed chunk a little too small for the next equal request, and the heap then grows
    (a 64 MB buffer freed and taken again faulted in anew on 0-3 of 3 takes), which the CSV's
    fault columns show."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def machine() -> str:
    """The CPU, the BLAS the numba kernels call and which code MKL runs: the ratios depend on
    all three (dense fp32 runs MKL, which runs its AVX2 code on non-Intel CPUs unless told
    otherwise; see bench/README.md, "MKL on AMD CPUs")."""
    from ssdfx.ops import blas

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    mkl = "Intel code paths" if blas.MKL_INTEL_PATH else "non-Intel (AVX2) code paths"
    lib = blas.LIBRARY
    if blas.SMALL_LIBRARY != lib:
        lib += f" (up to {blas.SMALL_GEMM_ROWS} rows: {blas.SMALL_LIBRARY})"
    return f"{model}; {os.cpu_count()} CPUs; numba BLAS {lib}; MKL {mkl}"


def measure(t, d, e, k, dtype, repeats, idle_wait=0.0, warmup=2, dense_dtype=None):
    """Rows of the two phases for one shape; dense_dtype: the dense baseline's dtype (default
    dtype; the sparse model is always converted from the same seeded FFN in dtype)."""
    dense_dtype = dense_dtype or dtype
    dense = dense_ffn(d, dtype)
    sparse = sparse_model(dense, e, k)
    if dense_dtype != dtype:
        dense = dense_ffn(d, dense_dtype)
    # fresh data at every call, written just before it as a previous layer would write it
    # (untimed, into the one input buffer). One batch repeated let the branch predictor learn
    # the routing's top-k and sort (torch.topk of a (512, 16) tensor took 17 us repeated, 93 us
    # on fresh data); batches used straight from a list of four were cold in cache (the sparse
    # forward at T=2048, d=768, E=16, k=4 took 30-32 ms instead of 25.5-26.2, dense unchanged:
    # the sparse path reads x K + 1 times); four batches cycled through the buffer hid what
    # new routing costs after the first rounds: bf16 GEMMs compiled by oneDNN for every new
    # expert row count (ssdfx.ops.layout.ROW_STEPS) showed up in the first repeats only
    gen = torch.Generator().manual_seed(0)

    def fresh(buf):
        return buf.normal_(generator=gen)

    def fwd(model):
        x = torch.empty(t, d, dtype=_dtype_of(model))

        def run():
            with torch.no_grad():
                model(x)
        def clear():
            fresh(x)
        return run, clear

    def fwd_bwd(model):
        params = list(model.parameters())
        dt = _dtype_of(model)
        xg, dy = torch.empty(t, d, dtype=dt).requires_grad_(), torch.empty(t, d, dtype=dt)

        def run():
            model(xg).backward(dy)
        def clear():
            with torch.no_grad():
                fresh(xg)
            fresh(dy)
            xg.grad = None
            for p in params:
                p.grad = None
        return run, clear

    cases = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        cases[(name, "fwd")] = fwd(model)
        cases[(name, "fwd+bwd")] = fwd_bwd(model)
    for run, clear in cases.values():  # warm-up (and numba's first-call load)
        for _ in range(warmup):
            clear()
            run()
    times = {key: [] for key in cases}
    faults = {key: [] for key in cases}
    quiet = busy = stolen = 0
    keys = list(cases)
    for rep in range(repeats):
        if idle_wait > 0:
            quiet += wait_idle(idle_wait)
            # the idle wait lets both cores sleep, and the first call after it paid for waking
            # them (at T=64, d=256 the dense forward, always first, took 1-11 ms against 0.4):
            # wake them with untimed calls
            for run, clear in cases.values():
                clear()
                run()
        # rotate the order, so that no case always runs first or always after the same one
        total0, _, steal0 = _cpu_times()
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            run, clear = cases[key]
            clear()
            ms, nf = _timed(run)
            times[key].append(ms)
            faults[key].append(nf)
        total1, _, steal1 = _cpu_times()
        busy += total1 - total0
        stolen += steal1 - steal0
    med = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        dense_ms, sparse_ms = med[("dense", phase)], med[("sparse", phase)]
        speedup = dense_ms / sparse_ms
        q1, q3 = paired_quartiles(times[("dense", phase)], times[("sparse", phase)])
        rows.append(dict(
            dtype=_name(dtype), dense_dtype=_name(dense_dtype),
            T=t, d=d, d_ff=4 * d, E=e, k=k, phase=phase,
            dense_ms=round(dense_ms, 2), sparse_ms=round(sparse_ms, 2),
            speedup=round(speedup, 2), ideal=round(e / k, 2), of_ideal=round(speedup * k / e, 2),
            # spread of the speedup: quartiles of dense / sparse within each repeat (the two
            # ran in the same round, a few ms apart, so the machine's drift between rounds
            # cancels); the median speedup above is a ratio of medians
            speedup_q1=round(q1, 2), speedup_q3=round(q3, 2),
            # median page faults per timed call: memory the allocator mapped fresh
            dense_faults=round(statistics.median(faults[("dense", phase)])),
            sparse_faults=round(statistics.median(faults[("sparse", phase)])),
            quiet_repeats=f"{quiet}/{repeats}" if idle_wait > 0 else "",
            # share of the timed repeats' CPU time the hypervisor gave to other guests: an
            # idle check cannot see it (nothing is stolen from an idle VM), and it slows the
            # cases unevenly; figures with more than a few percent are not comparable
            steal=round(stolen / busy, 3) if busy else "",
            machine=machine(),
        ))
    return rows


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]  # "bfloat16"


def paired_quartiles(dense: list[float], sparse: list[float]) -> tuple[float, float]:
    """First and third quartiles of the per-repeat speedups dense[i] / sparse[i]."""
    ratios = [a / b for a, b in zip(dense, sparse)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def verdicts(rows) -> list[str]:
    """Per phase, how the k = E/2 shapes compare with dense (the issue's "not slower than
    dense"), judged by the per-repeat speedups' quartiles: slower where even the third
    quartile is below 1, not slower where the first quartile is at least 1, else undecided."""
    out = []
    for phase in ("fwd", "fwd+bwd"):
        half = [r for r in rows if r["phase"] == phase and 2 * r["k"] == r["E"]]
        if not half:
            continue
        slower = [r for r in half if r["speedup_q3"] < 1]
        unsure = [r for r in half if r["speedup_q1"] < 1 <= r["speedup_q3"]]
        line = (f"k = E/2, {phase}: {len(half) - len(slower) - len(unsure)} of {len(half)} "
                f"not slower than dense (first quartile >= 1), {len(unsure)} undecided, "
                f"{len(slower)} slower (third quartile < 1)")
        for label, group in (("undecided", unsure), ("slower", slower)):
            if group:
                line += f"; {label}: " + ", ".join(
                    f"{r['dtype']} {r['T']}x{r['d']}x{r['E']}x{r['k']} {r['speedup']} "
                    f"[{r['speedup_q1']}, {r['speedup_q3']}]"
                    for r in group)
        out.append(line)
    return out


# SPEC section 6's CPU targets: the headline shape and its forward / forward+backward speedups
# (fp32), and the share of E/k the smaller shapes' forward must reach (per dtype)
HEADLINE = (2048, 768, 16, 4)
HEADLINE_TARGETS = {"fwd": 3.4, "fwd+bwd": 3.0}
SMALL_OF_IDEAL = 0.65  # T=512 or d=256, forward
BF16_D768_OF_IDEAL = 0.5  # bf16 at d=768, forward


def targets(rows) -> list[str]:
    """SPEC section 6's CPU targets judged on these rows (median speedups; the headline shape
    also shows its per-repeat quartiles), one line per target and dtype; targets whose shapes
    were not measured are left out."""
    out = []
    for dtype in dict.fromkeys(_label(r) for r in rows):
        mine = [r for r in rows if _label(r) == dtype]
        head = {r["phase"]: r for r in mine if (r["T"], r["d"], r["E"], r["k"]) == HEADLINE}
        if dtype == "float32" and head:
            out.append(f"{dtype} {'x'.join(map(str, HEADLINE))}: " + "; ".join(
                f"{phase} {r['speedup']}x [{r['speedup_q1']}, {r['speedup_q3']}], target "
                f">= {HEADLINE_TARGETS[phase]}x: {'met' if r['speedup'] >= HEADLINE_TARGETS[phase] else 'NOT met'}"
                for phase, r in head.items()))
        fwd = [r for r in mine if r["phase"] == "fwd"]
        groups = [(f"T=512 or d=256, fwd >= {SMALL_OF_IDEAL} of E/k", SMALL_OF_IDEAL,
                   [r for r in fwd if r["T"] == 512 or r["d"] == 256])]
        if dtype == "bfloat16":
            groups.append((f"d=768, fwd >= {BF16_D768_OF_IDEAL} of E/k", BF16_D768_OF_IDEAL,
                           [r for r in fwd if r["d"] == 768]))
        for label, bar, group in groups:
            if group:
                hit = sum(r["of_ideal"] >= bar for r in group)
                out.append(f"{dtype} {label}: {hit} of {len(group)} shapes")
        shapes = {}
        for r in mine:
            if r["T"] >= 64:
                shapes.setdefault((r["T"], r["d"], r["E"], r["k"]), []).append(r["speedup"])
        if shapes:
            slower = ["x".join(map(str, key)) for key in sorted(shapes) if min(shapes[key]) < 1]
            out.append(f"{dtype} T >= 64, never slower than dense: {len(slower)} of {len(shapes)} "
                       f"shapes have a phase below 1x" + (f" ({', '.join(slower)})" if slower else ""))
    return out


def _label(row) -> str:
    """The row's dtype, and the dense baseline's where it differs (--dense-dtype): the SPEC's
    targets compare the two FFNs in one dtype, so a mixed pair is judged on its own."""
    dense = row.get("dense_dtype", row["dtype"])
    return row["dtype"] if dense == row["dtype"] else f"{row['dtype']} vs {dense} dense"


def router_share(t, d, e, k, repeats=20) -> str:
    """The routing work (router scores, top-k, the op's sort by expert) as a share of the
    whole sparse forward (fp32, no grad, medians of back-to-back calls)."""
    from ssdfx.ops.cpu_numba import sort_pairs
    from ssdfx.routing import select_top_k

    sparse = sparse_model(dense_ffn(d), e, k)
    router = next(m for n, m in sparse.named_modules() if n.endswith("ssdfx_router"))
    xs = itertools.cycle([torch.randn(t, d) for _ in range(INPUTS)])  # fresh data each call

    def route():  # what the fp32 op runs: numba's top-k (in select_top_k) and counting sort
        idx, _ = select_top_k(router(next(xs)), k)
        sort_pairs(idx, e)

    def median_ms(fn):
        for _ in range(3):
            fn()
        return statistics.median(_timed(fn)[0] for _ in range(repeats))

    with torch.no_grad():
        whole, part = median_ms(lambda: sparse(next(xs))), median_ms(route)
    return (f"T={t} d={d} E={e} k={k}: sparse forward {whole:.2f} ms, router + top-k + sort "
            f"{part:.3f} ms = {100 * part / whole:.1f}%")


def configs(quick: bool, small: bool = False):
    if quick:
        return QUICK
    out = []
    for t in SMALL_T if small else FULL["T"]:
        for d in FULL["d"]:
            for e in FULL["E"]:
                for frac in FULL["k_frac"]:
                    out.append((t, d, e, max(1, round(e * frac))))
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    """rows (dicts with the same keys, in column order) as a CSV file, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows):
    cols = ["dtype", "dense_dtype", "T", "d", "E", "k", "phase", "dense_ms", "sparse_ms", "speedup",
            "speedup_q1", "speedup_q3", "ideal", "of_ideal", "dense_faults", "sparse_faults"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def shape_arg(text: str) -> tuple[int, int, int, int]:
    """argparse type: TxDxExK, with k <= E and E dividing the FFN width 4d."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[3] > shape[2]:
        raise argparse.ArgumentTypeError(f"expected T x d x E x k, all >= 1 and k <= E, like "
                                         f"64x256x16x4; got {text!r}")
    t, d, e, k = shape
    if 4 * d % e:
        raise argparse.ArgumentTypeError(f"{text}: E={e} does not divide the FFN width 4d={4 * d}")
    return shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="4 shapes (the T=2048, d=768 targets and a small one) instead of 54")
    which.add_argument("--small", action="store_true",
                       help="the sweep's 54 shapes at T in {64, 128, 256} instead of {512, 2048, "
                            "8192}: the SPEC's 'never slower than dense from T=64' below the "
                            "sweep (default CSV bench/results/op[_bf16|_both]_small.csv)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32")
    ap.add_argument("--repeats", type=positive_int, default=7, help="timed repeats per case (median)")
    ap.add_argument("--out", type=Path, default=None,
                    help="CSV path (default: bench/results/op[_bf16|_both][_quick].csv, so a quick "
                         "or bf16 run never replaces the fp32 sweep's file)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each repeat wait up to S seconds for an idle CPU whose host "
                         "steals under 3%% of its time (shared machines, VMs); the CSV records "
                         "how many repeats started so and the steal share while timing")
    which.add_argument("--shapes", nargs="+", type=shape_arg, metavar="TxDxExK", default=None,
                       help="measure these shapes instead of the sweep (e.g. 64x256x16x4); "
                            "default CSV bench/results/op_shapes[_bf16|_both].csv")
    ap.add_argument("--dense-dtype", choices=["same", "fp32"], default="same",
                    help="the dense baseline's dtype (default: --dtype's); fp32 compares a bf16 "
                         "sparse FFN with a float32 dense one, e.g. on a CPU where torch has "
                         "no native bf16 GEMM (CSV name gets _vs_fp32)")
    ap.add_argument("--warmup", type=positive_int, default=2, metavar="N",
                    help="untimed calls per case before the repeats (default 2)")
    ap.add_argument("--malloc", choices=["steady", "glibc"], default="steady",
                    help="steady (default): glibc keeps freed memory for reuse, as a caching "
                         "allocator would (see steady_malloc); glibc: its default thresholds, "
                         "which move with the allocation history")
    ap.add_argument("--router-share", action="store_true",
                    help="only print the routing share of the sparse forward at d=768 (fp32)")
    args = ap.parse_args(argv)
    if args.router_share:
        for t in FULL["T"]:
            print(router_share(t, 768, 16, 4), flush=True)
        return 0
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16],
              "both": [torch.float32, torch.bfloat16]}[args.dtype]
    if args.out is None:
        suffix = ({"fp32": "", "bf16": "_bf16", "both": "_both"}[args.dtype]
                  + ("_quick" if args.quick else "") + ("_small" if args.small else "")
                  + ("_vs_fp32" if args.dense_dtype == "fp32" else ""))
        stem = "op_shapes" if args.shapes else "op"
        args.out = ROOT / "bench" / "results" / f"{stem}{suffix}.csv"
    shapes = args.shapes or configs(args.quick, args.small)  # --shapes: checked while parsing
    steady = args.malloc == "steady" and steady_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"router: ssdfx.convert, {machine()}, malloc "
          f"{'steady' if steady else 'default'}", flush=True)
    dense_dtype = torch.float32 if args.dense_dtype == "fp32" else None
    from ssdfx.ops import blas

    if blas.HAS_MKL and not blas.MKL_INTEL_PATH:
        print("note: MKL runs its AVX2 code on this non-Intel CPU, dense float32 included "
              "(bench/mkl_intel_path.c preloaded lets it run what the CPU has; see "
              "bench/README.md, 'MKL on AMD CPUs')", flush=True)
    for dtype in dtypes:
        if dense_dtype is None and not native_gemm(dtype):
            print(f"note: torch has no native {_name(dtype)} GEMM on this CPU (it "
                  "needs AVX-512 or AMX): the dense baseline runs torch's generic loop, 1-10 "
                  "GFLOP/s on an AVX2-only EPYC (hours for a sweep), while the sparse op "
                  "computes in float32 (ssdfx.ops.widened). --dense-dtype fp32 compares it with "
                  "a float32 dense FFN instead.", flush=True)
    rows = []
    for dtype in dtypes:
        for t, d, e, k in shapes:
            new = measure(t, d, e, k, dtype, args.repeats, args.wait_idle, args.warmup,
                          dense_dtype)
            for r in new:
                r["malloc"] = "steady" if steady else "default"
                print(" ".join(f"{c}={r[c]}" for c in r), flush=True)
            rows += new
    write_csv(rows, args.out)
    print(markdown(rows))
    for line in verdicts(rows) + targets(rows):
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
