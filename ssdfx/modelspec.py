"""Build a model and example inputs from a short description, as the `ssdfx` CLI takes them.

Three kinds of spec:

* an HF model type ("gpt2", "bert", "llama", "t5", "opt", ...): built from transformers'
  default config for that type with `overrides` applied (`AutoConfig.for_model(type, **o)`),
  random weights, nothing downloaded. Example inputs: `input_ids` of (batch, seq_len) (and the
  other inputs the model's own dummy inputs name, e.g. T5's decoder ids), `use_cache=False`.
* a directory written by an HF model's `save_pretrained` (config.json and weights, e.g. a
  training run's final_dense/): that model, loaded with its own class; no config settings.
* a Python factory "package.module:function" or "path/to/file.py:function", called with
  `overrides` as keyword arguments. It returns a module, or a tuple whose first item is the
  module and whose other items give example inputs: a dict (keyword arguments of forward)
  and/or a tuple (positional arguments). tests/models.py's factories work as they are.

    >>> b = build(ModelSpec("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4}, seq_len=32))
    >>> b.model(*b.args, **b.kwargs).logits.shape
    torch.Size([1, 32, 50257])
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ssdfx.errors import SSDFXError

__all__ = ["ModelSpec", "Built", "build", "parse_value", "HEADS", "ALIASES", "FactoryError"]

# --head choices -> transformers' auto-mapping of model type -> class name; "auto" tries them in
# this order, so encoder-decoders get their seq2seq LM, encoders their masked LM.
HEADS = {
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "base": "MODEL_MAPPING_NAMES",
}
# Common options -> config keys that mean the same across families: the first one a config has,
# plus every key of _ALSO it has (encoder-decoders size both stacks).
ALIASES = {
    "n_layer": ("num_hidden_layers", "num_layers", "n_layer"),
    "d_model": ("hidden_size", "d_model", "n_embd"),
    "d_ff": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "dim_feedforward"),
    "n_head": ("num_attention_heads", "num_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}
_ALSO = {
    "n_layer": ("num_decoder_layers", "decoder_layers"),
    "d_ff": ("decoder_ffn_dim",),
    "n_head": ("num_decoder_heads", "decoder_attention_heads"),
}


DEFAULT_SEQ_LEN = 128  # example sequence length, unless the model has fewer positions


@dataclass(frozen=True)
class ModelSpec:
    """What to build: `name` (HF model type or MODULE:FACTORY), config overrides or factory
    keyword arguments, `aliases` (ALIASES keys -> values, HF only), the LM head, the example
    batch shape, seed and device ("cpu", or "meta": shapes only, no memory, no weights)."""

    name: str
    overrides: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    head: str = "auto"
    batch: int = 1
    seq_len: int | None = None  # None: min(128, the model's positions)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if not self.name:
            raise ValueError("model spec is empty; give an HF model type (e.g. gpt2) or MODULE:FACTORY")
        if self.head != "auto" and self.head not in HEADS:
            raise ValueError(f"head must be 'auto' or one of {sorted(HEADS)}, got {self.head!r}")
        if self.batch < 1 or (self.seq_len is not None and self.seq_len < 1):
            raise ValueError(f"batch and seq_len must be >= 1, got {self.batch} and {self.seq_len}")
        if self.device not in ("cpu", "meta"):
            raise ValueError(f"device must be 'cpu' or 'meta', got {self.device!r}")
        unknown = set(self.aliases) - set(ALIASES)
        if unknown:
            raise ValueError(f"unknown aliases {sorted(unknown)}; known: {sorted(ALIASES)}")

    @property
    def is_factory(self) -> bool:
        return ":" in self.name and not self.is_directory

    @property
    def is_directory(self) -> bool:
        """A local directory written by save_pretrained (config.json + weights)."""
        return os.path.isfile(os.path.join(self.name, "config.json"))


@dataclass(frozen=True)
class Built:
    model: nn.Module
    args: tuple
    kwargs: dict
    description: str


def parse_value(text: str):
    """A Python literal when `text` is one (2, 0.1, True, None, "x", [1, 2]), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


class FactoryError(SSDFXError, RuntimeError):
    """A MODULE:FUNCTION factory whose module failed to import or whose call raised; the
    original exception is the __cause__."""


def _failed(name: str, doing: str, e: BaseException) -> FactoryError:
    detail = str(e).strip().splitlines()
    return FactoryError(f"factory {name}: {doing} raised {type(e).__name__}"
                        f"{': ' + detail[0] if detail else ''}")


def _load_factory(name: str):
    target, _, func = name.rpartition(":")
    if not target or not func:
        raise ValueError(f"factory spec {name!r} must be MODULE:FUNCTION or FILE.py:FUNCTION")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise FileNotFoundError(f"no such file: {target}")
        mod_name = "_ssdfx_factory_" + os.path.splitext(os.path.basename(target))[0]
        spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # its sibling imports
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's module: a SyntaxError, or whatever its code raises
            raise _failed(name, f"loading {target}", e) from e
        finally:
            sys.path.pop(0)
    else:
        if os.getcwd() not in sys.path:  # console scripts do not put the cwd on sys.path
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise _failed(name, f"importing {target}", e) from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"{target} has no callable {func!r}")
    return fn


def _from_factory(spec: ModelSpec) -> tuple[nn.Module, tuple, dict, str]:
    if spec.aliases:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in spec.aliases)
        raise ValueError(f"{flags} apply to HF model types; pass a factory's arguments as "
                         f"--set NAME=VALUE")
    torch.manual_seed(spec.seed)
    factory = _load_factory(spec.name)
    try:
        with torch.device(spec.device):
            out = factory(**spec.overrides)
    except Exception as e:  # the user's code: any exception type
        args = ", ".join(f"{k}={v!r}" for k, v in spec.overrides.items())
        raise _failed(spec.name, f"the call {factory.__name__}({args})", e) from e
    model, args, kwargs = (out, None, None) if isinstance(out, nn.Module) else (None, None, None)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], nn.Module):
        model = out[0]
        for item in out[1:]:
            if isinstance(item, dict) and kwargs is None:
                kwargs = item
            elif isinstance(item, tuple) and args is None:
                args = item
    if model is None:
        raise TypeError(f"{spec.name} returned {type(out).__name__}; a factory returns an "
                        "nn.Module or (module, example kwargs dict and/or args tuple)")
    if args is None and kwargs is None:
        from ssdfx.capture import example_inputs

        auto = example_inputs(model)
        if auto is None:
            raise ValueError(f"{spec.name} returned no example inputs and {type(model).__name__} "
                             "has none of its own; return (model, {forward kwargs}) from it")
        args, kwargs = auto
    return model, tuple(args or ()), dict(kwargs or {}), spec.name


def _config(spec: ModelSpec):
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(spec.name)
    except ValueError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        near = difflib.get_close_matches(spec.name, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        if os.path.isdir(spec.name):
            raise ValueError(f"{spec.name} is a directory without config.json, not one written by "
                             "save_pretrained") from None
        if os.sep in spec.name or spec.name.startswith((".", "~")):
            raise ValueError(f"{spec.name}: no such directory") from None
        raise ValueError(f"{spec.name!r} is neither an HF model type{hint} nor a "
                         "MODULE:FACTORY path") from None
    keys = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    overrides = {}
    for alias, value in spec.aliases.items():
        key = next((k for k in ALIASES[alias] if k in keys), None)
        if key is None:
            raise ValueError(f"--{alias.replace('_', '-')}: {type(default).__name__} has none of "
                             f"{list(ALIASES[alias])}; use --set KEY=VALUE")
        overrides[key] = value
        overrides.update({k: value for k in _ALSO.get(alias, ()) if k in keys})
    for key, value in spec.overrides.items():
        if key not in keys:
            near = difflib.get_close_matches(key, sorted(keys), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"{type(default).__name__} has no setting {key!r}{hint}")
        overrides[key] = value
    try:
        return AutoConfig.for_model(spec.name, **overrides)
    except Exception as e:  # transformers' validators raise their own exception types
        detail = str(e).strip().splitlines()
        raise ValueError(f"{type(default).__name__} rejected the settings {overrides}: "
                         f"{detail[0] if detail else type(e).__name__}") from None


def _hf_model(spec: ModelSpec, cfg) -> nn.Module:
    import transformers
    from transformers.models.auto import modeling_auto

    heads = list(HEADS) if spec.head == "auto" else [spec.head]
    for head in heads:
        cls_name = getattr(modeling_auto, HEADS[head]).get(cfg.model_type)
        if cls_name and hasattr(transformers, cls_name):
            with torch.device(spec.device):
                return getattr(transformers, cls_name)(cfg)
    raise ValueError(f"transformers has no {spec.head} model for {cfg.model_type}; try --head base")


def _hf_inputs(spec: ModelSpec, model: nn.Module, cfg) -> tuple[tuple, dict]:
    from ssdfx.capture import example_inputs

    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    limit = limit if isinstance(limit, int) else None
    seq_len = spec.seq_len or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {limit} positions; "
                         f"pass --seq-len {limit} or less")
    auto = example_inputs(model)
    if auto is None:
        raise ValueError(f"{type(model).__name__} describes no example inputs")
    args, kwargs = auto
    g = torch.Generator().manual_seed(spec.seed)
    vocab = int(getattr(cfg, "vocab_size", 2))
    out = {}
    for key, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.dtype.is_floating_point:
            shape = (spec.batch, seq_len)
            # 0/1 tensors are masks: attend everywhere; the others are token ids: random tokens
            v = torch.ones(shape, dtype=v.dtype) if int(v.max()) <= 1 else \
                torch.randint(0, vocab, shape, generator=g, dtype=v.dtype)
        out[key] = v.to(spec.device) if isinstance(v, torch.Tensor) else v
    return tuple(args), out


def _from_directory(spec: ModelSpec):
    """An HF model saved with save_pretrained: its own class and weights (no download)."""
    import transformers

    from ssdfx.saving import META

    if os.path.isfile(os.path.join(spec.name, META)):
        raise ValueError(f"{spec.name} holds a model converted by ssdfx ({META}); open it in Python "
                         f"with ssdfx.load_converted({spec.name!r}) (ssdfx.revert(model) then gives "
                         "the dense model), or pass the dense model's directory")
    if spec.overrides or spec.aliases:
        raise ValueError(f"{spec.name} is a saved model: its config is fixed, so config settings "
                         "do not apply")
    cfg = transformers.AutoConfig.from_pretrained(spec.name, local_files_only=True)
    names = list(getattr(cfg, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if spec.device == "meta":
        model = _hf_model(spec, cfg)  # shapes only: the weights are not read
    elif cls is not None:
        model = cls.from_pretrained(spec.name, local_files_only=True)
    else:
        raise ValueError(f"{spec.name}/config.json names no transformers class "
                         f"(architectures: {names}); build it with a MODULE:FACTORY instead")
    return model, cfg


def build(spec: ModelSpec) -> Built:
    """The model (in eval mode) and example inputs that `spec` describes."""
    if spec.is_directory:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model, cfg = _from_directory(spec)
        args, kwargs = _hf_inputs(spec, model, cfg)
        origin = spec.name
    elif spec.is_factory:
        model, args, kwargs, origin = _from_factory(spec)
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        cfg = _config(spec)
        torch.manual_seed(spec.seed)
        model = _hf_model(spec, cfg)
        args, kwargs = _hf_inputs(spec, model, cfg)
        origin = f"{spec.name} config"
    model.eval()
    inputs = [f"{k} {tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    inputs += [f"arg{i} {tuple(v.shape)}" for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
    n = sum(p.numel() for p in model.parameters())
    return Built(model, args, kwargs, f"{type(model).__name__} from {origin} ({n / 1e6:.2f}M "
                 f"parameters, {spec.device}); inputs: {', '.join(inputs) or 'none'}")
