"""Rebuilding a DLRM from its saved configs, per-token state and weights, for checkpoints and
bundles alike. No training code: the serving side (a torch backend's eager model) uses it too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lma.embeddings import EmbeddingSpec, build_embedding
from lma.features import FeatureMap
from lma.model import DLRM, DLRMConfig, build_dlrm
from lma.ops.key_lookup import KeyTableUnavailable

logger = logging.getLogger(__name__)


def _state_arrays(state: Path | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(state, dict):
        return state
    if state is not None and Path(state).exists():
        with np.load(state, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return {}


def rebuild_model(model_config: dict[str, Any], embedding_config: dict[str, Any],
                  fmap: FeatureMap, state: Path | dict[str, Any] | None,
                  weights: dict[str, torch.Tensor] | None = None) -> DLRM:
    """The DLRM that saved configs describe, with the per-token state ``state`` (the arrays of
    ``embedding_state.npz``, or that file's path; may be absent); checkpoints and bundles load
    their weights into it.

    Without ``weights`` the model is untrained (randomly initialised). With ``weights`` (a state
    dict) it is built on the meta device, so no memory is filled with random values that would
    be overwritten, and then takes those tensors as its own (``load_state_dict(assign=True)``:
    memory-mapped tensors stay mapped, nothing is copied; key tables are taken from the weights
    too, see :class:`lma.ops.key_lookup.KeyLookup`). Should a kind make a derived buffer with a
    torch factory (left on the meta device), or the weights hold no usable key table and nothing
    to build one from, the model is rebuilt on the CPU from ``fmap`` instead and the weights are
    copied in, with a warning."""
    arrays = _state_arrays(state)
    spec = EmbeddingSpec.from_config(embedding_config)
    if weights is None:
        emb = build_embedding(spec, fmap, **arrays)
        return build_dlrm(DLRMConfig(**model_config), emb, fmap)
    with torch.device("meta"):
        emb = build_embedding(spec, fmap, **arrays)
        model = build_dlrm(DLRMConfig(**model_config), emb, fmap)
    why = ""
    try:
        _load_weights(model, weights, assign=True)
    except KeyTableUnavailable as exc:
        why = str(exc)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if why or left:
        why = why or f"{', '.join(left[:5])} cannot be built on the meta device"
        logger.warning("lean load: %s; building the model on the CPU and copying the weights in",
                       why)
        try:
            model = build_dlrm(DLRMConfig(**model_config), build_embedding(spec, fmap, **arrays),
                               fmap)
        except ValueError as exc:
            raise ValueError(f"{why}, and the model cannot be built without it: {exc}") from None
        _load_weights(model, weights, assign=False)
    return model


def _load_weights(model: DLRM, weights: dict[str, torch.Tensor], assign: bool) -> None:
    try:
        model.load_state_dict(weights, strict=True, assign=assign)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit the model its config describes ({e})") from None
