"""Atomic checkpoints: written to a temporary file in the same directory, then renamed.

A crash (even SIGKILL) at any moment leaves either the previous checkpoint or the new one,
never a torn file. Loading checks what the file is before trusting it.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from ssdfx.errors import SSDFXError

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "ssdfx-train-v1"


class CheckpointError(SSDFXError, RuntimeError):
    """A checkpoint that is missing, corrupt, or from an incompatible run. An `SSDFXError`, so
    the command line prints its message (not a traceback); still a `RuntimeError` for callers
    that catch that."""


def save_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **obj}, buf)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, expect: dict | None = None) -> dict:
    """Load a checkpoint; `expect` maps config keys that must match (e.g. the architecture)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without --resume")
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
        diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} is from an incompatible run ({lines}); resume "
                                  "with the same settings, or use a new --out-dir")
    return ckpt
