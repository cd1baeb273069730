"""The pure-torch reference kernels: the oracle every other backend is tested against.

Written for obviousness, not speed: one loop over experts, each expert gathering its tokens,
running its slice of the weights and scatter-adding its contribution. Works on any device and
dtype; float64 `torch.autograd.gradcheck` passes through it.

Kernel signatures (shared by every backend; the pair layout is in `ssdfx.ops.layout`):

    forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p)
        -> y (T, d), a1 (T*K, m), a3 (T*K or 0, m), order (T*K,), offsets (E+1,)
    backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p)
        -> dx (T, d), dw1 like w1, db1 (F,), dw2 like w2, dw3 like w3 or (0,), db3 (F,) or (0,),
           dgate (T, K)

x (T, d); w1, w3 (F, d); b1, b3 (F,) or None; w2 (d, F); expert_idx, gate (T, K);
keep (T, K, m) bool or None (the dropout keep-mask of every pair). Weight gradients have the
strides of their weights, so a weight passed as a transposed view gets its gradient back
without a copy.
"""

from __future__ import annotations

import torch

from ssdfx.ops.layout import hidden, hidden_backward, sort_pairs

__all__ = ["backward", "check_expert_idx", "forward"]


def check_expert_idx(expert_idx: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless every index is in [-1, num_experts)."""
    if expert_idx.numel() == 0:
        return
    lo, hi = int(expert_idx.min()), int(expert_idx.max())
    if lo < -1 or hi >= num_experts:
        raise ValueError(
            f"expert_idx must lie in [-1, {num_experts}) (-1 marks an unused slot); "
            f"got values in [{lo}, {hi}]"
        )


def forward(x, w1, b1, w2, w3, b3, expert_idx, gate, keep, num_experts, activation, dropout_p):
    t_all, d = x.shape
    k = expert_idx.shape[1]
    m = w1.shape[0] // num_experts
    check_expert_idx(expert_idx, num_experts)
    order, offsets = sort_pairs(expert_idx, num_experts)
    a1 = x.new_zeros(t_all * k, m)
    a3 = x.new_zeros(t_all * k if w3 is not None else 0, m)
    y = x.new_zeros(t_all, d)
    g = gate.reshape(-1)  # (T*K,)
    kp = keep.reshape(t_all * k, m) if keep is not None else None
    bounds = offsets.tolist()
    for e in range(num_experts):
        s, t = bounds[e], bounds[e + 1]
        if s == t:
            continue
        pairs = order[s:t]  # (n,)
        tok = pairs // k
        sl = slice(e * m, (e + 1) * m)
        xe = x[tok]  # (n, d)
        a = xe @ w1[sl].T  # (n, m)
        if b1 is not None:
            a = a + b1[sl]
        a1[s:t] = a
        u = None
        if w3 is not None:
            u = xe @ w3[sl].T
            if b3 is not None:
                u = u + b3[sl]
            a3[s:t] = u
        h = hidden(a, u, kp[pairs] if kp is not None else None, dropout_p, activation)
        y.index_add_(0, tok, (h @ w2[:, sl].T) * g[pairs].unsqueeze(1))
    return y, a1, a3, order, offsets


def backward(dy, x, w1, w2, w3, gate, keep, a1, a3, order, offsets, num_experts, activation,
             dropout_p):
    t_all, d = x.shape
    k = gate.shape[1]
    f_all = w1.shape[0]
    m = f_all // num_experts
    glu = w3 is not None
    dx = torch.zeros_like(x)
    dw1 = torch.empty_like(w1)
    dw2 = torch.empty_like(w2)
    db1 = x.new_empty(f_all)
    dw3 = torch.empty_like(w3) if glu else x.new_empty(0)
    db3 = x.new_empty(f_all if glu else 0)
    dgate = x.new_zeros(t_all * k)
    g = gate.reshape(-1)
    kp = keep.reshape(t_all * k, m) if keep is not None else None
    bounds = offsets.tolist()
    for e in range(num_experts):
        s, t = bounds[e], bounds[e + 1]
        sl = slice(e * m, (e + 1) * m)
        if s == t:
            for grad in (dw1[sl], dw2[:, sl], db1[sl]) + ((dw3[sl], db3[sl]) if glu else ()):
                grad.zero_()
            continue
        pairs = order[s:t]
        tok = pairs // k
        xe, dye = x[tok], dy[tok]  # (n, d)
        dh_raw = dye @ w2[:, sl]  # (n, m)
        dg, gh, da1, da3 = hidden_backward(
            dh_raw, g[pairs], a1[s:t], a3[s:t] if glu else None,
            kp[pairs] if kp is not None else None, dropout_p, activation,
        )
        dgate[pairs] = dg
        dw2[:, sl] = dye.T @ gh
        dw1[sl] = da1.T @ xe
        db1[sl] = da1.sum(0)
        dxe = da1 @ w1[sl]
        if glu:
            dw3[sl] = da3.T @ xe
            db3[sl] = da3.sum(0)
            dxe = dxe + da3 @ w3[sl]
        dx.index_add_(0, tok, dxe)
    return dx, dw1, db1, dw2, dw3, db3, dgate.view(t_all, k)
