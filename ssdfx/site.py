"""What ssdfx knows about one FFN site, and the per-node metadata its passes leave behind."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LinearRef", "NeuronDims", "FFNSite", "Scope", "NodeInfo", "META_KEY"]

# Per-node state lives in node.meta[META_KEY] (a graph copy keeps meta, not attributes).
META_KEY = "ssdfx"


class NeuronDims:
    """For a linear map with a `transposed` flag: which weight dimension indexes the FFN neurons."""

    transposed: bool

    @property
    def neuron_dim_in(self) -> int:
        """The weight dimension that indexes the FFN neurons when this map produces them."""
        return 1 if self.transposed else 0

    @property
    def neuron_dim_out(self) -> int:
        """The weight dimension that indexes the FFN neurons when this map consumes them."""
        return 0 if self.transposed else 1


@dataclass(frozen=True)
class LinearRef(NeuronDims):
    """A linear map of the site, backed by model parameters (fully qualified names).

    `transposed` is True when the weight is stored (in_features, out_features), as HF's
    Conv1D and a bare `x @ W` store it; nn.Linear stores (out_features, in_features).
    """

    weight: str
    bias: str | None
    transposed: bool
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Scope:
    """Where a site is rewritten.

    kind "module": `path` names a module whose forward fx can trace; it is replaced by the
    rewritten GraphModule. kind "chain": `path` names a module fx cannot trace (BERT's layer,
    OPT's decoder layer, the root of an nn.Sequential); the site runs through its children
    `children` (head, middles..., tail), each traced and rewritten on its own.
    """

    kind: str
    path: str
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class FFNSite:
    """One FFN: x -> w_in [, w_up] -> activation -> w_out.

    For a GLU FFN, h = act(x w_in^T) * (x w_up^T). `path` is the smallest module that holds the
    whole site. `activation` is a name from ssdfx.activations.ACTIVATIONS, or "unknown" when
    the elementwise chain matches none of them (find_ffns reports it, convert refuses it).
    """

    path: str
    kind: str
    d_model: int
    d_ff: int
    activation: str
    w_in: LinearRef
    w_out: LinearRef
    w_up: LinearRef | None = None
    dropout_p: float = 0.0
    modules: tuple[str, ...] = ()
    scope: Scope = field(default_factory=lambda: Scope("module", ""))

    @property
    def name(self) -> str:
        """A stable key for the site: the fully qualified name of its input weight."""
        return self.w_in.weight

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "activation": self.activation,
            "w_in": self.w_in.weight,
            "w_up": self.w_up.weight if self.w_up else None,
            "w_out": self.w_out.weight,
            "dropout_p": self.dropout_p,
            "scope": self.scope.kind,
        }


@dataclass(frozen=True)
class NodeInfo:
    """Stored in node.meta["ssdfx"] on every node a pass creates."""

    pass_name: str
    site: str
    role: str
