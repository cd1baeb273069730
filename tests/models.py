"""Tiny offline test models: HF models from small configs, a nanoGPT-style block, plain MLPs.

Each factory returns (model, example inputs as kwargs, expected FFN weight names). The expected
names are written out from each architecture's documented structure: an independent reference
for the matcher, which never looks at names.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 97


def _ids(batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def gpt2(activation="gelu_new", n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                     activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    m = GPT2LMHeadModel(cfg)
    ids = _ids()
    expected = [(f"transformer.h.{i}.mlp.c_fc.weight", None, f"transformer.h.{i}.mlp.c_proj.weight") for i in range(n_layer)]
    return m, dict(input_ids=ids, labels=ids), expected


def bert(n_layer=2):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                     num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64)
    m = BertForMaskedLM(cfg)
    ids = _ids()
    expected = [(f"bert.encoder.layer.{i}.intermediate.dense.weight", None, f"bert.encoder.layer.{i}.output.dense.weight") for i in range(n_layer)]
    return m, dict(input_ids=ids, labels=ids), expected


def t5(gated=False):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    m = T5ForConditionalGeneration(cfg)
    ids = _ids()
    if gated:
        expected = [(f"{p}.DenseReluDense.wi_0.weight", f"{p}.DenseReluDense.wi_1.weight", f"{p}.DenseReluDense.wo.weight")
                    for p in ("encoder.block.0.layer.1", "decoder.block.0.layer.2")]
    else:
        expected = [(f"{p}.DenseReluDense.wi.weight", None, f"{p}.DenseReluDense.wo.weight")
                    for p in ("encoder.block.0.layer.1", "decoder.block.0.layer.2")]
    return m, dict(input_ids=ids, labels=ids), expected


def llama(n_layer=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    m = LlamaForCausalLM(cfg)
    ids = _ids()
    expected = [(f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight") for i in range(n_layer)]
    return m, dict(input_ids=ids, labels=ids), expected


def opt(n_layer=2):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=n_layer,
                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                    dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    m = OPTForCausalLM(cfg)
    ids = _ids()
    expected = [(f"model.decoder.layers.{i}.fc1.weight", None, f"model.decoder.layers.{i}.fc2.weight") for i in range(n_layer)]
    return m, dict(input_ids=ids, labels=ids), expected


def bart():
    """FFN inline in the layer, with a functional activation dropout (rate 0) between."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    m = BartForConditionalGeneration(cfg)
    ids = _ids()
    expected = [(f"model.{p}.layers.0.fc1.weight", None, f"model.{p}.layers.0.fc2.weight") for p in ("encoder", "decoder")]
    return m, dict(input_ids=ids, labels=ids), expected


def vit():
    """An image model: example inputs come from the config (pixel_values), not input_ids."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=3, hidden_dropout_prob=0.0)
    m = ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g), labels=torch.tensor([0, 2]))
    return m, kwargs, [(f"vit.layers.{i}.mlp.fc1.weight", None, f"vit.layers.{i}.mlp.fc2.weight") for i in range(2)]


def whisper():
    """A speech model (input_features) whose FFNs are inline in the encoder/decoder layers."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                        max_target_positions=16, num_mel_bins=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, dropout=0.0)
    m = WhisperForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(input_features=torch.randn(2, 8, 32, generator=g), labels=torch.randint(3, VOCAB, (2, 5), generator=g))
    return m, kwargs, [(f"model.{p}.layers.0.fc1.weight", None, f"model.{p}.layers.0.fc2.weight") for p in ("encoder", "decoder")]


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head = n_head

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, d, hidden, dropout=0.0):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """nanoGPT's transformer block."""

    def __init__(self, d=32, n_head=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, 4 * d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class InlineBlock(Block):
    """A block whose FFN is inline in its own forward (no MLP module)."""

    def __init__(self, d=32, n_head=4):
        super().__init__(d, n_head)
        del self.mlp
        self.fc_in = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_out(F.relu(self.fc_in(self.ln_2(x))))


class SinMLP(nn.Module):
    """An FFN whose activation (sin) is none ssdfx supports."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.sin(self.a(x)))


def block():
    torch.manual_seed(0)
    m = Block()
    return m, dict(x=torch.randn(2, 7, 32)), [("mlp.c_fc.weight", None, "mlp.c_proj.weight")]


def inline_block():
    torch.manual_seed(0)
    m = nn.Sequential(InlineBlock(), InlineBlock())
    return m, dict(input=torch.randn(2, 7, 32)), [(f"{i}.fc_in.weight", None, f"{i}.fc_out.weight") for i in range(2)]


def sequential_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.0), nn.Linear(64, 16))
    return m, dict(input=torch.randn(5, 16)), [("0.weight", None, "3.weight")]


class RootMLP(nn.Module):
    """The FFN is the root module's own forward, with an inline functional activation."""

    def __init__(self, d=16, hidden=64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def root_mlp():
    torch.manual_seed(0)
    return RootMLP(), dict(x=torch.randn(5, 16)), [("fc1.weight", None, "fc2.weight")]


HF = {
    "gpt2": gpt2,
    "gpt2_relu": lambda: gpt2("relu"),
    "bert": bert,
    "t5": t5,
    "t5_gated": lambda: t5(gated=True),
    "llama": llama,
    "opt": opt,
    "bart": bart,
    "vit": vit,
    "whisper": whisper,
}
PLAIN = {"block": block, "inline_block": inline_block, "sequential": sequential_mlp, "root_mlp": root_mlp}
ALL = {**HF, **PLAIN}
EXPECTED_ACTIVATION = {
    "gpt2": "gelu_tanh", "gpt2_relu": "relu", "bert": "gelu", "t5": "relu", "t5_gated": "gelu_tanh",
    "llama": "silu", "opt": "relu", "block": "gelu", "inline_block": "relu", "sequential": "relu",
    "bart": "gelu", "vit": "gelu", "whisper": "gelu", "root_mlp": "relu",
}


def output_of(model, kwargs):
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


def loss_of(model, kwargs):
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out.square().mean()
    return out.loss

