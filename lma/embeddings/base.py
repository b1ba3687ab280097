"""The embedding interface every kind implements, and the registry that builds kinds by name.

An embedding maps (B, S) int64 tokens (token hash v1; 0 = padding) to (B, S, d) floats. DLRM
never branches on the kind. Each kind is built from a budget of parameters, so that every kind at
the same ``--compression`` has the same number of embedding parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lma.features import FeatureMap


@dataclass
class EmbeddingSpec:
    """What a kind needs to build itself."""

    kind: str
    dim: int
    n_params: int  # embedding parameter budget (floats)
    seed: int = 0
    min_count: int = 1  # vocabulary threshold for full tables (and the budget's reference)
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific (Z, T, aligned, ...)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EmbeddingSpec:
        """The spec of an ``Embedding.config()`` dict (as saved in checkpoints and bundles)."""
        return cls(kind=config["kind"], dim=int(config["dim"]), n_params=int(config["n_params"]),
                   seed=int(config.get("seed", 0)), min_count=int(config.get("min_count", 1)),
                   options=dict(config.get("options", {})))


class Embedding(nn.Module, ABC):
    kind: ClassVar[str]

    def __init__(self, spec: EmbeddingSpec):
        super().__init__()
        self.spec = spec
        self.dim = spec.dim

    @classmethod
    @abstractmethod
    def build(cls, spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> Embedding:
        """Create the module for ``spec`` on the data described by ``feature_map``."""

    @abstractmethod
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, S, d) float32."""

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self) -> int:
        """Bytes of per-token state needed at serving besides parameters (vocabulary, signatures)."""
        return 0

    def serving_bytes(self) -> int:
        """Parameters (float32) plus per-token state: what a server must hold for this embedding."""
        return 4 * self.parameter_count() + self.state_bytes()

    def config(self) -> dict[str, Any]:
        """JSON-able description (the spec); ``build_embedding`` rebuilds the module from it."""
        return {
            "kind": self.kind,
            "dim": self.spec.dim,
            "n_params": self.spec.n_params,
            "seed": self.spec.seed,
            "min_count": self.spec.min_count,
            "options": dict(self.spec.options),
        }

    def extra_state_arrays(self) -> dict[str, Any]:
        """Per-token state (numpy arrays) that ``build(spec, feature_map, **arrays)`` needs to rebuild
        this module exactly; saved beside the weights in checkpoints and bundles."""
        return {}

    @classmethod
    def prepare(cls, spec: EmbeddingSpec, feature_map: FeatureMap, train_tokens: Any,
                progress: bool = False) -> dict[str, Any]:
        """Compute per-token state from the training tokens ((N, S) int64 numpy) before ``build``;
        e.g. LMA's minhash signatures. Returns keyword arguments for ``build``."""
        return {}

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (trained with a sparse-capable optimizer)."""
        return []


def as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Rows read from float16 storage (bundles exported with ``lma export --dtype float16``) as
    float32: the model computes in float32 whatever its tables are stored in. Float32 rows pass
    through untouched, so trained and float32 models trace exactly as before."""
    return x if x.dtype == torch.float32 else x.float()


def building_for_load() -> bool:
    """True while a model is being built on the meta device to receive loaded weights
    (:func:`lma.rebuild.rebuild_model`): kinds then skip derived state that the weights carry,
    such as key tables, instead of computing it only to have it replaced."""
    return bool(torch.empty(0).is_meta)


EMBEDDINGS: dict[str, type[Embedding]] = {}


def register(cls: type[Embedding]) -> type[Embedding]:
    EMBEDDINGS[cls.kind] = cls
    return cls


def build_embedding(spec: EmbeddingSpec, feature_map: FeatureMap, **state: Any) -> Embedding:
    """Build a kind by name. ``state`` passes per-token state a kind may need (e.g. signatures)."""
    # Import the kinds so that they register themselves.
    from lma import embeddings  # noqa: F401

    if spec.kind not in EMBEDDINGS:
        raise ValueError(f"unknown embedding kind {spec.kind!r}; known: {sorted(EMBEDDINGS)}")
    return EMBEDDINGS[spec.kind].build(spec, feature_map, **state)  # type: ignore[attr-defined]
