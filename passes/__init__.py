"""Graph rewrite passes. Each is `(GraphModule, config) -> PassResult`; run them through
`run_pass`, which cleans up and recompiles once."""

from .densify import densify
from .infra import PassResult, SiteReport, inverse_permutation, permute_, run_pass
from .chain import HeadConfig, bypass, hoist_out, moefy_head
from .moefy import MoefyConfig, moefy, site_tensors
from .observe import ObservePassConfig, observe, unobserve
from .relufy import RelufyConfig, relufy

__all__ = [
    "PassResult", "SiteReport", "run_pass", "permute_", "inverse_permutation",
    "MoefyConfig", "HeadConfig", "moefy", "moefy_head", "bypass", "hoist_out", "densify",
    "site_tensors", "observe", "unobserve", "ObservePassConfig", "relufy", "RelufyConfig",
]
