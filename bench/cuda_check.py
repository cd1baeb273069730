"""One-shot GPU check of the sparse operator: equality with the CPU reference, then speed.

    python bench/cuda_check.py --out DIR [--quick]

1. runs `pytest -m cuda tests/test_ops_cuda.py` (CUDA kernels vs the CPU reference, forward and
   every gradient, fp32 and bf16) and keeps its log;
2. times the gathered Triton kernels (`ssdfx.ops.gathered.up`, `weight_grad`) alone in a few
   tile configurations against the eager steps they replace, and keeps the fastest;
3. times, in bf16 with CUDA events (median of repeats, dense and sparse interleaved), the dense
   cuBLAS FFN (Linear -> GELU -> Linear) against the sparse op with a router (Linear(d, E),
   top-k, straight-through softmax gate) for each CUDA backend and variant (torch,
   grouped_mm, grouped_mm+fused, grouped_mm+gathered), forward and forward+backward. The
   headline shape is T=16384, d=4096, d_ff=16384, E=16, k=4 (target >= 0.7 x E/k);
4. profiles one training step of each grouped_mm variant at the headline shape.

Writes DIR/cuda_check.csv, DIR/cuda_check.md, DIR/cuda_gathered_configs.csv,
DIR/cuda_profile_*.txt and DIR/cuda_tests.log. Not a test: it needs a GPU and prints timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from op import write_csv  # noqa: E402

from ssdfx.ops import cuda_kernels, gathered, grouped, moe_ffn  # noqa: E402
from ssdfx.ops.grouped import grouped_mm_ok  # noqa: E402

FUSED = "grouped_mm+fused"  # grouped_mm with its elementwise middle compiled (FUSED_DEVICES)
GATHERED = "grouped_mm+gathered"  # its forward up-projection in one Triton kernel (gathered.up)
VARIANTS = ["grouped_mm", FUSED, GATHERED]


def _backend(name, dev):
    """The backend string for moe_ffn, after setting grouped.FUSED_DEVICES and
    gathered.GATHERED_DEVICES for this variant."""
    grouped.FUSED_DEVICES = (dev,) if name == FUSED else ()
    gathered.GATHERED_DEVICES = (dev,) if name == GATHERED else ()
    return "grouped_mm" if name in (FUSED, GATHERED) else name


def route(x, wr, k):
    """Router: scores, top-k, straight-through softmax gate (forward value exactly 1)."""
    scores = x @ wr.t()  # (T, E)
    top = scores.topk(k, dim=-1)
    soft = torch.softmax(top.values.float(), dim=-1).to(x.dtype)
    gate = soft - soft.detach() + 1.0
    return top.indices, gate


def cuda_time(fn, reps):
    if not torch.cuda.is_available():  # dry run on CPU
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_shape(t, d, e, k, backends, repeats, inner, dtype=torch.bfloat16, dev="cuda"):
    f_all = 4 * d
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(t, d, device=dev, dtype=dtype, generator=g)
    w1 = (torch.randn(f_all, d, device=dev, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    b1 = torch.zeros(f_all, device=dev, dtype=dtype).requires_grad_()
    w2 = (torch.randn(d, f_all, device=dev, generator=g) * f_all ** -0.5).to(dtype)
    w2.requires_grad_()
    wr = (torch.randn(e, d, device=dev, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(t, d, device=dev, dtype=dtype, generator=g)

    def dense_fwd():
        with torch.no_grad():
            F.linear(F.gelu(F.linear(x, w1, b1)), w2)

    def dense_fb():
        F.linear(F.gelu(F.linear(xg, w1, b1)), w2).backward(dy)

    def sparse(name, backward):
        def fn():
            backend = _backend(name, dev)
            if backward:
                idx, gate = route(xg, wr, k)
                moe_ffn(xg, w1, b1, w2, None, None, idx, gate, num_experts=e,
                        activation="gelu", backend=backend).backward(dy)
            else:
                with torch.no_grad():
                    idx, gate = route(x, wr, k)
                    moe_ffn(x, w1, b1, w2, None, None, idx, gate, num_experts=e,
                            activation="gelu", backend=backend)
        return fn

    cases = {"dense/fwd": dense_fwd, "dense/fwd+bwd": dense_fb}
    for b in backends:
        cases[f"{b}/fwd"] = sparse(b, False)
        cases[f"{b}/fwd+bwd"] = sparse(b, True)
    for name, fn in list(cases.items()):  # warm-up (cuBLAS heuristics, allocator, compiles)
        if name not in cases:  # its variant failed in the other phase
            continue
        try:
            fn()
            fn()
        except Exception as exc:  # a variant that fails here must not cost the others' rows
            print(f"{name} at {(t, d, e, k)} failed: {exc!r:.500}", flush=True)
            backends = [b for b in backends if b != name.split("/")[0]]
            for phase in ("fwd", "fwd+bwd"):
                cases.pop(f"{name.split('/')[0]}/{phase}", None)
    if dev == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved
        for name, fn in cases.items():
            times[name].append(cuda_time(fn, inner))
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = []
    for b in backends:
        for phase in ("fwd", "fwd+bwd"):
            dense, sp = med[f"dense/{phase}"], med[f"{b}/{phase}"]
            rows.append(dict(T=t, d=d, d_ff=f_all, E=e, k=k, dtype=str(dtype).split(".")[-1],
                             backend=b, phase=phase, dense_ms=round(dense, 4),
                             sparse_ms=round(sp, 4), speedup=round(dense / sp, 3),
                             ideal=e / k, of_ideal=round(dense / sp / (e / k), 3)))
    return rows


def profile_headline(out: Path, backend: str, t=16384, d=4096, e=16, k=4):
    """Kernel-level time split of one sparse forward+backward (where the overhead goes)."""
    from torch.profiler import ProfilerActivity, profile

    dtype, f_all = torch.bfloat16, 4 * d
    x = torch.randn(t, d, device="cuda", dtype=dtype, requires_grad=True)
    w1 = (torch.randn(f_all, d, device="cuda") * d ** -0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(d, f_all, device="cuda") * f_all ** -0.5).to(dtype).requires_grad_()
    wr = (torch.randn(e, d, device="cuda") * d ** -0.5).to(dtype).requires_grad_()

    def step():
        idx, gate = route(x, wr, k)
        moe_ffn(x, w1, None, w2, None, None, idx, gate, num_experts=e, activation="gelu",
                backend=_backend(backend, "cuda")).sum().backward()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    (out / f"cuda_profile_{backend.replace('+', '_')}.txt").write_text(table)
    print(table[:4000], flush=True)


# tile configurations of the gathered kernels tried at the headline shape (the first of each
# is the default, gathered.CONFIG and gathered.CONFIG_WGRAD)
# (each compiles for sm90 without register spills: tests/test_triton_compile.py)
GATHERED_CONFIGS = [
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=5),
    dict(BM=64, BN=256, BK=64, num_warps=8, num_stages=4),
    dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=5),
    dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=5),
]
WGRAD_CONFIGS = [
    dict(BD=128, BM=128, BR=64, num_warps=8, num_stages=4),
    dict(BD=128, BM=128, BR=64, num_warps=4, num_stages=4),
    dict(BD=256, BM=128, BR=64, num_warps=8, num_stages=3),
    dict(BD=128, BM=256, BR=64, num_warps=8, num_stages=3),
    dict(BD=128, BM=64, BR=64, num_warps=4, num_stages=5),
]


def _sweep(kind, attr, configs, eager, fused, dev, reps):
    """Times eager() and, per tile configuration set as gathered.<attr>, fused(); keeps the
    fastest configuration. Rows for the CSV."""
    want = eager()
    base = statistics.median(cuda_time(eager, reps) for _ in range(5))
    rows, best = [], None
    saved = dict(getattr(gathered, attr))
    for cfg in configs if dev == "cuda" else configs[:1]:  # CPU: checks the script only
        setattr(gathered, attr, dict(cfg))
        try:
            err = float((fused().float() - want.float()).abs().max())
            ms = statistics.median(cuda_time(fused, reps) for _ in range(5))
        except Exception as exc:  # e.g. too much shared memory for this GPU
            print(f"{kind} config {cfg} failed: {exc!r}", flush=True)
            continue
        rows.append(dict(kernel=kind, config=cfg, eager_ms=round(base, 4),
                         gathered_ms=round(ms, 4), speedup=round(base / ms, 3),
                         max_abs_diff=round(err, 4)))
        print(rows[-1], flush=True)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    setattr(gathered, attr, dict(best[1]) if best else saved)
    print(f"{kind} kernel config: {getattr(gathered, attr)}", flush=True)
    return rows


def sweep_gathered(out: Path, t=16384, d=4096, e=16, k=4, dev="cuda", reps=10):
    """The gathered kernels alone against the eager steps they replace, per tile
    configuration: `up` against x rows gathered, grouped GEMM, bias and GELU; `weight_grad`
    (w1's) against x rows gathered, grouped GEMM, zeroing of empty experts and the copy into
    w1's layout. Keeps the fastest configurations (gathered.CONFIG, CONFIG_WGRAD) for the
    timings that follow. Writes DIR/cuda_gathered_configs.csv."""
    from ssdfx.ops.layout import expert_views, rows_grad, sort_pairs

    dtype, f_all = torch.bfloat16, 4 * d
    m = f_all // e
    x = torch.randn(t, d, device=dev, dtype=dtype)
    w1 = (torch.randn(f_all, d, device=dev) * d ** -0.5).to(dtype)
    b1 = torch.randn(f_all, device=dev, dtype=dtype)
    da1 = torch.randn(t * k, m, device=dev, dtype=dtype)
    idx = torch.randn(t, e, device=dev).topk(k, dim=-1).indices
    order, offsets = sort_pairs(idx, e)
    offs32 = offsets[1:].to(torch.int32)
    nonempty = offsets[1:] > offsets[:-1]
    w1e = expert_views(w1, w1.t(), None, e)[0]
    row_expert = idx.reshape(-1)[order]

    def eager_up():
        a1 = grouped._gmm(x.index_select(0, order // k), w1e.transpose(1, 2), offs32)
        return grouped._up_epilogue(a1, None, b1, None, row_expert, None, 0.0, "gelu")

    def eager_wgrad():
        xs = x.index_select(0, order // k)
        return rows_grad(w1, grouped._weight_grads(da1.t(), xs, offs32, nonempty))

    rows = _sweep("up", "CONFIG", GATHERED_CONFIGS, eager_up,
                  lambda: gathered.up(x, w1, b1, None, None, order, offsets, k, "gelu")[2],
                  dev, reps)
    rows += _sweep("weight_grad", "CONFIG_WGRAD", WGRAD_CONFIGS, eager_wgrad,
                   lambda: gathered.weight_grad(x, da1, order, offsets, k, w1, True), dev, reps)
    if rows:
        write_csv(rows, out / "cuda_gathered_configs.csv")


def run_tests(out: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_ops_cuda.py")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / "cuda_tests.log").write_text(log)
    print(log[-3000:])
    print(f"tests: rc={proc.returncode} in {time.time() - t0:.1f}s", flush=True)
    return proc.returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--quick", action="store_true", help="headline shape only, fewer repeats")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS,
                    help="the grouped_mm variants to time and profile beside torch (default: "
                         "all; fewer save device time)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("this check needs a CUDA device and none is visible; --dry-run checks the "
                 "script on CPU with tiny shapes")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # the gathered kernel on CPU, if Triton is here
        rows = bench_shape(64, 64, 8, 2, ["torch", *VARIANTS[:2 + cuda_kernels.available()]],
                           repeats=2, inner=1, dev="cpu")
        print(rows)
        if cuda_kernels.available():
            sweep_gathered(args.out, t=64, d=64, e=8, k=2, dev="cpu", reps=1)
        return 0
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"{torch.cuda.get_device_name()} cc{torch.cuda.get_device_capability()}, "
          f"_grouped_mm: {hasattr(torch, '_grouped_mm')}", flush=True)
    rc = 0 if args.skip_tests else run_tests(args.out)
    if cuda_kernels.available() and GATHERED in args.variants:
        try:
            sweep_gathered(args.out)
        except Exception as exc:
            print(f"gathered sweep failed: {exc!r}", flush=True)
    shapes = [(16384, 4096, 16, 4)]
    if not args.quick:
        shapes += [(16384, 4096, 16, 8), (16384, 4096, 8, 1), (4096, 1024, 16, 4)]
    rows = []
    for t, d, e, k in shapes:
        probe = torch.empty(1, d, device="cuda", dtype=torch.bfloat16)
        backends = ["torch"] + (args.variants
                                if grouped_mm_ok(probe, torch.empty(4 * d, d), e) else [])
        try:
            new = bench_shape(t, d, e, k, backends, repeats=5 if args.quick else 7, inner=3)
        except Exception as exc:  # keep what was measured so far
            print(f"shape {(t, d, e, k)} failed: {exc!r}", flush=True)
            continue
        rows += new
        for r in new:
            print(r, flush=True)
        torch.cuda.empty_cache()
    if rows:
        write_tables(rows, args.out)
    for backend in args.variants:
        try:
            profile_headline(args.out, backend)
        except Exception as exc:
            print(f"profile {backend} failed: {exc!r}", flush=True)
    return rc


def write_tables(rows, out):
    write_csv(rows, out / "cuda_check.csv")
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "cuda_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    sys.exit(main())
