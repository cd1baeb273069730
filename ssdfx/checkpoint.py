"""The run directory of `ssdfx train`: atomic checkpoints, and what the directory holds.

Checkpoints are written to a temporary file in the same directory, then renamed: a crash (even
SIGKILL) at any moment leaves either the previous checkpoint or the new one, never a torn file.
Loading checks what the file is before trusting it.

A directory holds a run when its config.json is the settings of one (`run_settings`); the files
a run writes are `RUN_FILES`, and only those are ever deleted (`start_run_dir`, on --overwrite).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from ssdfx.errors import SSDFXError
from ssdfx.tables import name_list

__all__ = ["save_atomic", "write_text_atomic", "load_checkpoint", "CheckpointError", "FORMAT",
           "RUN_FILES", "run_settings", "finished_record", "check_new_run_dir", "start_run_dir",
           "remove_stale_temps"]

FORMAT = "ssdfx-train-v1"
# everything a run writes in its directory (config.json first, so a run is recognisable from
# its first moment); nothing else there is ever deleted
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pt", "plots", "final_dense", "final_moe")
# keys every ssdfx training config.json has had: how a run's config.json is told from others
_RUN_KEYS = frozenset({"model", "n_layer", "n_embd", "n_head", "ctx", "mode", "steps", "num_experts",
                       "top_k", "seed", "batch_size"})


class CheckpointError(SSDFXError, RuntimeError):
    """A checkpoint that is missing, corrupt, or from an incompatible run. An `SSDFXError`, so
    the command line prints its message (not a traceback); still a `RuntimeError` for callers
    that catch that."""


def _temp_path(path: Path) -> Path:
    # `.NAME.<random>.tmp` next to `path`: what `remove_stale_temps` looks for
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _write_atomic(data: bytes, path: Path) -> None:
    tmp = _temp_path(path)
    try:
        # open() with mode 0o666 lets the umask decide the permissions, as for every other file
        # the run writes (mkstemp's 0o600 made checkpoint.pt the only file others cannot read)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **obj}, buf)
    _write_atomic(buf.getbuffer(), path)


def write_text_atomic(text: str, path: str | Path) -> None:
    _write_atomic(text.encode(), Path(path))


def load_checkpoint(path: str | Path, expect: dict | None = None) -> dict:
    """Load a checkpoint; `expect` maps config keys that must match the saved ones (a key the
    checkpoint's config does not have, a setting added since it was written, is not compared)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}, so the run cannot be resumed; start it over "
                              "with --overwrite instead of --resume, or choose another --out-dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); delete it to "
            "start over, or restore it from a copy") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ssdfx training checkpoint (format {FORMAT!r} expected)")
    if expect:
        saved = ckpt.get("config", {})
        diff = {k: (saved[k], v) for k, v in expect.items() if k in saved and saved[k] != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} is from an incompatible run ({lines}); resume "
                                  "with the same settings, or use a new --out-dir")
    return ckpt


# -- the run directory ----------------------------------------------------------------------------


def run_settings(out: str | Path) -> dict | None:
    """The settings recorded in the config.json of the run in `out`, or None when `out` holds
    no run (no config.json, or one that is not an ssdfx training config)."""
    try:
        saved = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):  # missing, a directory, not text, not JSON
        return None
    return saved if isinstance(saved, dict) and _RUN_KEYS <= saved.keys() else None


def finished_record(out: str | Path) -> dict | None:
    """The "final" record of the run in `out` when it finished (the record is written after its
    final models and before its final checkpoint), else None."""
    try:
        lines = (Path(out) / "log.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("kind") == "final":
            return record
    return None


def _names(paths) -> str:
    return name_list(p.name + ("/" if p.is_dir() else "") for p in paths)


def check_new_run_dir(out: str | Path, overwrite: bool) -> None:
    """Raise FileExistsError unless a new run may start in `out`: it is missing or empty, or it
    holds a run and `overwrite` is set. Reads only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out-dir {out} is a file, not a directory; choose a new or empty directory")
    present = list(out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if run_settings(out) is None:
        note = " (--overwrite replaces a previous ssdfx run, never other files)" if overwrite else ""
        raise FileExistsError(f"{out} is not empty ({_names(present)}) and holds no ssdfx run; choose an "
                              f"empty or new --out-dir{note}")
    if overwrite:
        return
    held = _names(out / n for n in RUN_FILES if (out / n).exists())
    done = finished_record(out)
    if done is not None:
        raise FileExistsError(f"{out} holds a run that finished at step {done.get('steps')} ({held}); pass "
                              "--overwrite to replace it, or choose another --out-dir")
    if not (out / "checkpoint.pt").is_file():
        raise FileExistsError(f"{out} holds a run that stopped before its first checkpoint ({held}), so it "
                              "cannot be resumed; pass --overwrite to start it over, or choose another --out-dir")
    raise FileExistsError(f"{out} holds a run ({held}); pass --resume to continue it, --overwrite to "
                          "replace it, or choose another --out-dir")


def remove_stale_temps(out: str | Path) -> None:
    """Remove the temporary files of writes a kill interrupted (`.NAME.<random>.tmp` of a run
    file, and log.tmp of earlier versions)."""
    out = Path(out)
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    (out / "log.tmp").unlink(missing_ok=True)


def start_run_dir(out: str | Path, config: dict) -> None:
    """Make `out` the directory of a new run with `config`: the previous run's files, when it
    holds one, are removed (nothing else is), then config.json and an empty log.jsonl are written.
    Call `check_new_run_dir` first."""
    out = Path(out)
    if run_settings(out) is not None:  # no file of the previous run may pass for this one's
        # config.json last (it is replaced below): a kill in between leaves a directory that is
        # still recognisably a run's
        for name in RUN_FILES[1:]:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        remove_stale_temps(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(config, indent=1), out / "config.json")
    (out / "log.jsonl").write_text("")
