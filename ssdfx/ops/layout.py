"""The pair layout every kernel shares, and the elementwise middle of the expert FFN.

A routed FFN call has T tokens with K expert slots each. Pair p = t * K + j is token t's slot j;
its expert is expert_idx[t, j] (-1: an unused slot, from dynamic-k). Kernels work on pairs
sorted by expert:

    order   (T*K,) int64   the valid pairs sorted stably by expert, then the unused slots
    offsets (E+1,) int64   expert e's pairs are order[offsets[e]:offsets[e+1]]; P = offsets[E]
    a1, a3  (T*K, m)       pre-activations of those pairs, row r for pair order[r]; rows >= P
                           are zero, except in the sync-free grouped_mm backend where they are
                           unspecified (a3 has 0 rows for a plain FFN)

The forward op returns these so that its backward op never recomputes the sort or the
up-projections; any kernel's backward can consume any kernel's forward (tests rely on it).

Per pair the expert computes h = act(a1) [* a3] [* keep / (1 - p)] and y_pair = h w2_e^T;
the elementwise part is the same torch code for every backend.
"""

from __future__ import annotations

import torch

from ssdfx.activations import activation_backward, activation_fn

__all__ = ["ROW_STEPS", "add_rows", "cols_grad", "expert_views", "gemm_rows", "hidden",
           "hidden_backward", "keep_scale", "rounds_rows", "rows_grad", "sort_pairs", "sum_dtype",
           "sum_slots", "unit_gates"]

# Row counts of the per-expert GEMMs on CPU in bf16/fp16 are rounded up to one of ROW_STEPS
# values per octave (`gemm_rows`). torch runs those GEMMs in oneDNN, which compiles a kernel
# for every new shape and caches it: on the Zen 5 VM a bf16 (M, 768) @ (768, 192) took 6.5-8.7
# ms the first time an M was seen and 0.08-0.27 ms after (mm, bmm and matmul alike, and a new
# contraction length K the same). Routing gives every call new per-expert row counts, so with
# fresh data each call kept meeting new shapes: 100 calls of T=2048, d=768, E=16, k=4 still
# took 22-38 ms against 12 at a third of the calls after 50. With 16 steps per octave at most
# 1/16 of an expert's rows is padding (rows that belong to no pair, never read back), and a
# layer sees a few dozen shapes per GEMM. float32 goes to MKL's sgemm, which compiles nothing.
ROW_STEPS = 16


def sort_pairs(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) expert indices -> order (T*K,), offsets (E+1,), as described above."""
    flat = expert_idx.reshape(-1)  # (T*K,)
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(key, stable=True)  # (T*K,)
    # each expert's first row in the sorted keys; searchsorted, unlike bincount, does not
    # read a value back to the host, so a GPU caller never waits here
    bounds = torch.arange(num_experts + 1, dtype=key.dtype, device=key.device)
    offsets = torch.searchsorted(key.index_select(0, order), bounds)  # (E+1,)
    return order, offsets


def rounds_rows(x: torch.Tensor) -> bool:
    """Whether this call's per-expert GEMMs take `gemm_rows` row counts (CPU bf16/fp16)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def gemm_rows(n: int) -> int:
    """n rounded up to a multiple of 2^(floor(log2 n)) / ROW_STEPS (exact below 2 ROW_STEPS):
    ROW_STEPS values per octave, at most n / ROW_STEPS rows added."""
    if n <= 0:
        return n
    step = max(1, (1 << (n.bit_length() - 1)) // ROW_STEPS)
    return -(-n // step) * step


def expert_views(w1, w2, w3, num_experts):
    """Per-expert weight views, no copy for Linear or Conv1D layouts: w1_e and w3_e (E, m, d)
    (w3's None for a plain FFN) and w2_e (E, d, m)."""
    f_all, d = w1.shape
    m = f_all // num_experts
    w1e = w1.reshape(num_experts, m, d)
    w3e = w3.reshape(num_experts, m, d) if w3 is not None else None
    w2_edm = w2.reshape(d, num_experts, m).permute(1, 0, 2)
    return w1e, w3e, w2_edm


def rows_grad(w: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
    """(F, d) gradient with w's strides from per-expert blocks (E, m, d); no copy when w and
    the blocks are contiguous (the blocks then already are its rows)."""
    if w.is_contiguous() and per_expert.is_contiguous():
        return per_expert.view(w.shape)
    out = torch.empty_like(w)
    out.view(per_expert.shape).copy_(per_expert)
    return out


def cols_grad(w2: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
    """(d, F) gradient with w2's strides from per-expert blocks (E, d, m) of its columns."""
    out = torch.empty_like(w2)
    out.view(w2.shape[0], per_expert.shape[0], -1).permute(1, 0, 2).copy_(per_expert)
    return out


def keep_scale(keep: torch.Tensor | None, dropout_p: float, dtype: torch.dtype):
    # inverted dropout: kept units are scaled by 1/(1-p) so the expectation is unchanged
    if keep is None:
        return None
    return keep.to(dtype) * (1.0 / (1.0 - dropout_p))


def hidden(
    a1: torch.Tensor,
    a3: torch.Tensor | None,
    keep: torch.Tensor | None,
    dropout_p: float,
    activation: str,
) -> torch.Tensor:
    """h (P, m) = act(a1) [* a3] [* keep / (1 - p)] for pairs in layout order."""
    h = activation_fn(activation)(a1)
    if a3 is not None:
        h = h * a3
    ks = keep_scale(keep, dropout_p, a1.dtype)
    if ks is not None:
        h = h * ks
    return h


def hidden_backward(
    dh_raw: torch.Tensor,
    gate: torch.Tensor,
    a1: torch.Tensor,
    a3: torch.Tensor | None,
    keep: torch.Tensor | None,
    dropout_p: float,
    activation: str,
):
    """Backward of the elementwise part for pairs in layout order.

    dh_raw (P, m) = dy_t w2_e (the gradient at h before the gate), gate (P,).
    Returns dgate (P,) = <dy_t, expert_e(x_t)> = rowsum(dh_raw * h), gh = gate * h (for dW2),
    da1 (P, m) and da3 (P, m) or None.
    """
    f = activation_fn(activation)(a1)
    ks = keep_scale(keep, dropout_p, a1.dtype)
    h = f if a3 is None else f * a3
    if ks is not None:
        h = h * ks
    # accumulate the row sums in at least fp32 (bf16 inputs)
    acc = torch.promote_types(a1.dtype, torch.float32)
    dgate = (dh_raw * h).sum(1, dtype=acc).to(a1.dtype)
    g = gate.unsqueeze(1)  # (P, 1)
    gh = h * g
    dh = dh_raw * g
    if ks is not None:
        dh = dh * ks
    if a3 is None:
        return dgate, gh, activation_backward(activation, dh, a1), None
    da3 = dh * f
    da1 = activation_backward(activation, dh * a3, a1)
    return dgate, gh, da1, da3


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a token's K rows are added up in: float32 for bf16/fp16 (one rounding at the
    end, as the CUDA combine and the numba bf16 kernels do; K-1 roundings in bf16 put a sum of
    K=8 rows past the float32 reference's bound), else the rows' own."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def add_rows(rows: torch.Tensor, tok: torch.Tensor, t_all: int) -> torch.Tensor:
    """(t_all, c): out[tok[i]] += rows[i], sequentially in row order (`index_add_`,
    deterministic), in `sum_dtype`; the caller rounds once."""
    wide = sum_dtype(rows.dtype)
    return rows.new_zeros(t_all, rows.shape[1], dtype=wide).index_add_(0, tok, rows.to(wide))


def sum_slots(rows: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """(T, c): y[t] = the sum over slots j of rows[slot_rows[t, j]], added in slot order.

    K gathers and K-1 in-place adds, each parallel; bf16/fp16 rows add up in float32 and round
    once (bf16 on CPU: one numba pass, `cpu_numba.sum_slots_bf16`, the same bits). On CPU in
    bf16 the gathers and adds (in bf16 then) were 1.2-3.2x faster than `index_add_` over the
    same rows (serial per row): T=2048, d=256, K=4 266 against 398 us; d=768 906 against 1696;
    T=8192, d=256, K=2 514 against 1637 (one gather of all K rows and a sum over K took 1008,
    2456 and 2393 us).
    """
    if rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and slot_rows.shape[1] > 1:
        from ssdfx.ops.cpu_numba import sum_slots_bf16

        return sum_slots_bf16(rows, slot_rows)
    cols = slot_rows.t().contiguous()  # (K, T)
    y = rows.index_select(0, cols[0])
    if cols.shape[0] == 1:
        return y
    if cols.shape[0] > 2:  # two rows: bf16's one add already rounds once
        y = y.to(sum_dtype(y.dtype))
    for j in range(1, cols.shape[0]):
        y += rows.index_select(0, cols[j])
    return y.to(rows.dtype)


def unit_gates(gate: torch.Tensor) -> bool:
    """Whether every gate is exactly 1.0, as the router's are in the forward pass, so that
    multiplying h by them can be skipped (a pass over (P, m)). Checked on CPU only: elsewhere
    reading the answer would sync the host."""
    return gate.device.type == "cpu" and bool((gate == 1.0).all())
