"""The routed-expert FFN operator.

PLACEHOLDER (foundation issue): a pure-torch implementation with the final signature, so that
the passes can be built and tested. The sparse-operator issue replaces it with the
`torch.library.custom_op` `ssdfx::moe_ffn` (reference, numba CPU and CUDA kernels).
"""

from __future__ import annotations

import torch

from ssdfx.activations import activation_fn

__all__ = ["moe_ffn"]


def moe_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    b3: torch.Tensor | None,
    expert_idx: torch.Tensor,
    gate: torch.Tensor,
    *,
    num_experts: int,
    activation: str,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y[t] = sum_j gate[t, j] * expert_{idx[t, j]}(x[t]); no output bias.

    x (..., d); w1, w3 (F, d); b1, b3 (F,); w2 (d, F); expert_idx, gate (..., K).
    Expert e owns neurons [e*m, (e+1)*m), m = F // num_experts.
    expert(x) = (act(x w1_e^T + b1_e) [* (x w3_e^T + b3_e)]) w2_e^T.
    """
    act = activation_fn(activation)
    lead = x.shape[:-1]
    d = x.shape[-1]
    xf = x.reshape(-1, d)  # (T, d)
    idx = expert_idx.reshape(xf.shape[0], -1)  # (T, K)
    g = gate.reshape(xf.shape[0], -1)  # (T, K)
    m = w1.shape[0] // num_experts
    y = xf.new_zeros(xf.shape)
    for e in range(num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        sl = slice(e * m, (e + 1) * m)
        xe = xf.index_select(0, tok)  # (n_e, d)
        h = xe @ w1[sl].T
        if b1 is not None:
            h = h + b1[sl]
        h = act(h)
        if w3 is not None:
            u = xe @ w3[sl].T
            if b3 is not None:
                u = u + b3[sl]
            h = h * u
        if dropout_p > 0.0:
            h = torch.nn.functional.dropout(h, dropout_p, training=True)
        ye = (h @ w2[:, sl].T) * g[tok, slot].unsqueeze(1)  # (n_e, d)
        y = y.index_add(0, tok, ye)
    return y.reshape(*lead, d)
