"""HF models built from small configs for pre-training, and MLM masking."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["build_model", "mlm_batch", "MODEL_TYPES"]

MODEL_TYPES = ("gpt2", "bert")


def build_model(model_type: str, *, vocab_size: int, n_layer: int, n_embd: int, n_head: int,
                ctx: int, d_ff: int, activation: str, seed: int) -> nn.Module:
    """A randomly initialised causal LM (gpt2) or masked LM (bert); no dropout."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    if model_type == "gpt2":
        act = {"gelu": "gelu_new"}.get(activation, activation)
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=ctx, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, n_inner=d_ff, activation_function=act, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    if model_type == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer,
                         num_attention_heads=n_head, intermediate_size=d_ff, hidden_act=activation,
                         max_position_embeddings=ctx, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=vocab_size - 1)
        return BertForMaskedLM(cfg)
    raise ValueError(f"unknown model {model_type!r}; choose one of {MODEL_TYPES}")


def mlm_batch(tokens: torch.Tensor, mask_id: int, vocab: int, *, seed: int, step: int, rank: int = 0,
              rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (15%: 80% [MASK], 10% random, 10% kept); labels -100 elsewhere.
    Deterministic in (seed, step, rank)."""
    g = np.random.default_rng([seed, step, rank, 7])
    shape = tokens.shape
    chosen = torch.from_numpy(g.random(shape) < rate)
    kind = torch.from_numpy(g.random(shape))
    rand_tok = torch.from_numpy(g.integers(0, vocab, size=shape))
    inputs = tokens.clone()
    inputs[chosen & (kind < 0.8)] = mask_id
    swap = chosen & (kind >= 0.8) & (kind < 0.9)
    inputs[swap] = rand_tok[swap]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return inputs, labels
