"""Exceptions raised by ssdfx. Each message names the problem and the fix.

All of them are raised before the model is modified: a failed `convert` or `revert`
leaves the model exactly as it was.
"""

from __future__ import annotations

__all__ = [
    "SSDFXError",
    "NoFFNFoundError",
    "TraceError",
    "UnsupportedSiteError",
    "NotConvertedError",
    "AlreadyConvertedError",
]


class SSDFXError(Exception):
    """Base class of every ssdfx error."""


class NoFFNFoundError(SSDFXError, ValueError):
    """No linear -> elementwise -> linear subgraph was found in the model."""


class TraceError(SSDFXError, RuntimeError):
    """The part of the model that holds an FFN could not be captured as a graph."""


class UnsupportedSiteError(SSDFXError, ValueError):
    """An FFN was found but cannot be rewritten (activation, shape or structure)."""


class NotConvertedError(SSDFXError, ValueError):
    """`revert` (or a sparse-only operation) on a model that `convert` never rewrote."""


class AlreadyConvertedError(SSDFXError, ValueError):
    """`convert` on a model that is already converted."""
