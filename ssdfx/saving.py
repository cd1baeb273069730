"""Save a converted model to a directory and rebuild it: `save_converted`, `load_converted`.

A directory holds

    model.safetensors   the converted model's state dict (shared tensors, such as GPT-2's tied
                        embedding and output layer, are stored once)
    ssdfx.json          num_experts, top_k, dynamic_k, the router kind, the sites, per site
                        its activation and the state-dict key of its neuron permutation (its
                        router sits beside it)
    config.json         for Hugging Face models: their config (`save_pretrained`), so that
                        `load_converted(dir)` can build the model by itself

A save goes into a missing or empty directory, or replaces an earlier save (overwrite=True), and
nothing else: a directory holding a dense model or other files is refused.

Rebuilding is convert again with the saved splits and routers of the right shapes, then
loading the weights: the result computes exactly what was saved. Any other model is rebuilt by
passing a dense instance of the same architecture: `load_converted(dir, model=MyModel())`.
Sites saved with ReLU where the rebuilt model has another activation were relufied
(`ssdfx.relufy`, which leaves the config alone) and are relufied again; parameters and
buffers take the dtypes they were saved in (a bf16 save loads as bf16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ssdfx.tables import name_list

__all__ = ["load_converted", "save_converted"]

FORMAT = 1
META = "ssdfx.json"
WEIGHTS = "model.safetensors"


OWN_FILES = ("config.json", WEIGHTS, META)  # what a save writes; all that overwrite removes
# weights of a model that is not an ssdfx save (save_pretrained shards and their index, pickles)
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """`path` as a Path, if save_converted may write there: a missing or empty directory, or an
    earlier ssdfx save (it has ssdfx.json) when `overwrite` is set. FileExistsError otherwise,
    naming what the directory holds. Reads only."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a directory; choose a new or empty directory")
    # the temporary files of an interrupted save are not worth keeping (a save replaces them)
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    present = [n for n in present if n not in {f + ".tmp" for f in OWN_FILES}]
    if not present:
        return path
    if META not in present:
        kind = ("a model saved by save_pretrained or other weights" if
                any(n.endswith(_OTHER_WEIGHTS) for n in present) else "files")
        raise FileExistsError(f"{path} is not empty: it holds {kind} that ssdfx did not write "
                              f"({name_list(present)}); save into a new or empty directory")
    other = [n for n in present if n != WEIGHTS and n.endswith(_OTHER_WEIGHTS)]
    if other:
        raise FileExistsError(f"{path} holds an ssdfx save ({META}) and other model weights too "
                              f"({name_list(other)}), which saving there would not remove; save into "
                              "a new or empty directory")
    if not overwrite:
        raise FileExistsError(f"{path} holds a converted model saved by ssdfx ({META}); pass "
                              "overwrite=True (ssdfx convert --overwrite) to replace it, or save "
                              "into a new or empty directory")
    return path


def save_converted(model: nn.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a converted model to directory `path` (created if needed); returns the path.

    `path` must be missing or empty, or hold an earlier save_converted save, which is replaced
    only with `overwrite=True` (its files, OWN_FILES, are replaced or removed; nothing else in
    the directory is touched). Anything else there raises FileExistsError before writing."""
    from safetensors.torch import save_model

    import ssdfx
    from ssdfx.api import permutation_buffers
    from ssdfx.errors import NotConvertedError

    conv = ssdfx.conversion(model)
    if conv is None:
        raise NotConvertedError("save_converted saves a converted model; call ssdfx.convert(model) "
                                "first (or save a dense model with its own save method)")
    path = check_target(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    # every file is written under a temporary name and renamed into place at the end, so an
    # interrupted save leaves the previous one in the directory as it was
    renames = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):  # a Hugging Face config
        config.to_json_file(path / "config.json.tmp")
        renames.append("config.json")
    tmp_weights, tmp_meta = path / (WEIGHTS + ".tmp"), path / (META + ".tmp")
    save_model(model, str(tmp_weights))
    _follow_umask(tmp_weights)
    tmp_meta.write_text(json.dumps({
        "format": FORMAT, "model_class": type(model).__name__,
        "num_experts": conv.num_experts, "top_k": conv.top_k, "dynamic_k": conv.dynamic_k,
        "router": conv.router,
        "sites": [s.name for s in conv.sites], "perm_buffers": permutation_buffers(model),
        "activations": {s.name: s.activation for s in conv.sites},
    }, indent=1))
    for name in renames + [WEIGHTS, META]:
        (path / (name + ".tmp")).replace(path / name)
    # an earlier save's file that this one does not write (the config.json of an HF model, when
    # a plain module is saved over it) must not pass for part of this save
    for name in set(OWN_FILES) - set(renames + [WEIGHTS, META]):
        (path / name).unlink(missing_ok=True)
    return path


def _follow_umask(path: Path) -> None:
    """Give `path` the permissions open() would (0666 less the umask): safetensors creates its
    files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def shell_routers(state: Mapping, perm_paths: dict[str, str]) -> dict[str, nn.Module]:
    """Routers shaped like those in a saved state dict, for convert(router=...) before the
    state is loaded. A site's router sits beside its permutation buffer with the same suffix
    (`x.ssdfx_perm_1` goes with `x.ssdfx_router_1`)."""
    from ssdfx.routing import CentroidRouter, MLPRouter

    out = {}
    for site, key in perm_paths.items():
        holder, buf = key.rsplit(".", 1)
        prefix = f"{holder}.ssdfx_router{buf[len('ssdfx_perm'):]}."
        if prefix + "weight" in state:
            out[site] = CentroidRouter(torch.zeros_like(state[prefix + "weight"]))
        elif prefix + "net.0.weight" in state:
            w0, w1 = state[prefix + "net.0.weight"], state[prefix + "net.2.weight"]
            out[site] = MLPRouter(w0.shape[1], w1.shape[0], w0.shape[0])
        else:
            raise ValueError(f"the saved state has no router for site {site} (expected keys "
                             f"starting with {prefix!r}); the file is incomplete")
    return out


def load_converted(path: str | Path, model: nn.Module | None = None, *,
                   example_inputs: tuple | None = None,
                   example_kwargs: dict | None = None) -> nn.Module:
    """Rebuild a model written by `save_converted` (in eval mode).

    Without `model`, the directory must hold a Hugging Face config (config.json); the model
    class is the saved one. Otherwise pass a dense instance of the saved architecture (its
    weights are replaced), with example inputs if it needs them to be traced.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    import ssdfx

    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} has no {META}: not a directory written by "
                                "ssdfx.save_converted (or `ssdfx convert --out`)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} is format {meta.get('format')!r}; this ssdfx reads "
                         f"format {FORMAT}")
    if model is None:
        model = _hf_model(path, meta["model_class"])
    elif ssdfx.is_converted(model):
        raise ValueError("load_converted needs a dense model to convert; got a converted one")
    paths = meta["perm_buffers"]
    # the permutations and router shapes are read on their own (a few small tensors); the
    # weights are read once, by load_model, which also restores tied tensors
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        state = TensorsOnDemand(f)
        missing = [k for k in paths.values() if k not in state]
        if missing:
            raise ValueError(f"{path / WEIGHTS} lacks the permutation buffers {missing}")
        found = ssdfx.find_ffns(model, example_inputs, example_kwargs)
        sites = [s for s in found if s.name in paths]
        if {s.name for s in sites} != set(paths):
            raise ValueError(f"the model's FFN sites {sorted(s.name for s in found)} do not "
                             f"match the saved ones {sorted(paths)}: pass a model of the saved "
                             "architecture")
        sites = _same_activations(model, sites, meta.get("activations", {}),
                                  example_inputs, example_kwargs)
        partition = {site: state[key] for site, key in paths.items()}
        routers = shell_routers(state, paths)
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    ssdfx.convert(model, meta["num_experts"], meta["top_k"], sites=sites, partition=partition,
                  router=routers, dynamic_k=meta.get("dynamic_k"),
                  example_inputs=example_inputs, example_kwargs=example_kwargs)
    # the routers were passed as modules (shapes only), which convert calls "custom"
    ssdfx.conversion(model).router = meta.get("router", "custom")
    _cast_to_saved(model, dtypes)
    load_model(model, str(path / WEIGHTS))
    return model.eval()


_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                 "F64": torch.float64}


def _cast_to_saved(model: nn.Module, dtypes: dict[str, str]) -> None:
    """Give each floating parameter and buffer the dtype its state-dict entry was saved in
    (safetensors names, e.g. "BF16"), in place: load_model copies values into the tensors as
    they are, converting them to the model's dtypes."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    for key, t in named.items():
        want = _FLOAT_DTYPES.get(dtypes.get(key, ""))
        if want is not None and t.is_floating_point() and t.dtype != want:
            t.data = t.data.to(want)


def _same_activations(model, sites, saved, example_inputs, example_kwargs):
    """The sites, relufied where they were saved with ReLU and the rebuilt model has another
    activation; ValueError for any other difference. `saved` maps site names to activations
    (empty for files written before activations were recorded)."""
    import ssdfx

    relu = [s for s in sites if saved.get(s.name, s.activation) == "relu" != s.activation]
    other = [f"{s.name}: saved {saved[s.name]}, the model has {s.activation}" for s in sites
             if saved.get(s.name, s.activation) not in ("relu", s.activation)]
    if other:
        raise ValueError("the saved FFN activations differ from the model's (" + "; ".join(other)
                         + "): pass a dense model of the saved architecture")
    if not relu:
        return sites
    ssdfx.relufy(model, sites=relu)
    names = {s.name for s in sites}
    return [s for s in ssdfx.find_ffns(model, example_inputs, example_kwargs) if s.name in names]


class TensorsOnDemand(Mapping):
    """A safetensors file as a read-only mapping that reads a tensor when it is looked up."""

    def __init__(self, handle):
        self._f = handle
        self._keys = frozenset(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _hf_model(path: Path, class_name: str) -> nn.Module:
    import transformers

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds no config.json (the saved model was not a Hugging Face "
                         "model): pass a dense instance, load_converted(path, model=...)")
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"transformers has no class {class_name!r}: pass a dense instance, "
                         "load_converted(path, model=...)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return cls(config)
