"""ssdfx: Switchable Sparse-Dense Learning for any PyTorch Transformer, as an fx graph rewrite.

    import ssdfx
    sites = ssdfx.find_ffns(model)                    # FFNs found by graph structure
    ssdfx.convert(model, num_experts=8, top_k=2)      # every FFN -> router + routed experts
    print(ssdfx.flops(model))                         # FLOPs per site, dense and sparse
    print(ssdfx.debug.listing(model, 0))              # a site's graph before and after
    stats = ssdfx.observe(model, batches)             # sparsity, activation mass, co-activation
    ssdfx.save_converted(model, "moe/")               # weights, splits, routers
    model = ssdfx.load_converted("moe/")              # rebuilt (HF models; else pass model=)
    ssdfx.revert(model)                               # back to dense, exactly
"""

from ssdfx.api import (
    ConversionReport,
    conversion,
    convert,
    converted_sites,
    find_ffns,
    is_converted,
    original_modules,
    revert,
)
from ssdfx.errors import (
    AlreadyConvertedError,
    NoFFNFoundError,
    NotConvertedError,
    SSDFXError,
    TraceError,
    UnsupportedSiteError,
)
from ssdfx.site import FFNSite, LinearRef, Scope
from ssdfx import debug
from ssdfx.flopcount import flops
from ssdfx.floptable import FlopTable
from ssdfx.relu import relufy
from ssdfx.saving import load_converted, save_converted
from ssdfx.stats import SiteStats, observe

__version__ = "0.1.0"

__all__ = [
    "convert", "revert", "find_ffns", "is_converted", "converted_sites", "conversion",
    "ConversionReport",
    "FFNSite", "LinearRef", "Scope",
    "SSDFXError", "NoFFNFoundError", "TraceError", "UnsupportedSiteError", "NotConvertedError",
    "AlreadyConvertedError",
    "flops", "FlopTable", "debug", "observe", "SiteStats", "relufy", "original_modules",
    "save_converted", "load_converted",
]


def __getattr__(name: str):
    # modules that pull in numba and networkx (clustering) load on first use, so that
    # `import ssdfx` stays light: ssdfx.stability, ssdfx.split
    if name in ("stability", "split"):
        import importlib

        return importlib.import_module(f"ssdfx.{name}")
    raise AttributeError(f"module 'ssdfx' has no attribute {name!r}")
