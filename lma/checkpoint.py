"""Self-describing training checkpoints: model config, feature map, weights, metrics, versions.

Layout of a checkpoint folder:
    checkpoint.pt          torch.save of {"format", "model_config", "embedding_config",
                           "state_dict", "versions", "train_config", "history"}
    feature_map.json/.npz  the schema and per-field token counts (lma.features.FeatureMap)
    embedding_state.npz    per-token state of the embedding (e.g. LMA signatures), maybe empty
    metrics.json           evaluation results of the run
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lma
from lma.embeddings import EmbeddingSpec, build_embedding
from lma.features import FeatureMap
from lma.jsonio import json_default
from lma.model import DLRM, DLRMConfig, build_dlrm

CHECKPOINT_FORMAT = 2  # 2: DLRM carries dense standardisation buffers


@dataclass
class Checkpoint:
    model: DLRM
    feature_map: FeatureMap
    config: dict[str, Any]  # the whole checkpoint.pt payload minus the state dict
    metrics: dict[str, Any]
    path: Path


def library_versions() -> dict[str, str]:
    return {
        "lma": lma.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(out: str | Path, model: DLRM, fmap: FeatureMap, metrics: dict[str, Any],
                    train_config: dict[str, Any] | None = None,
                    history: list[dict[str, float]] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmap.save(out)
    np.savez(out / "embedding_state.npz", **model.embedding.extra_state_arrays())
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_config": model.config.to_dict(),
            "embedding_config": model.embedding.config(),
            "state_dict": model.state_dict(),
            "versions": library_versions(),
            "train_config": train_config or {},
            "history": history or [],
        },
        out / "checkpoint.pt",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
    return out


def rebuild_model(model_config: dict[str, Any], embedding_config: dict[str, Any],
                  fmap: FeatureMap, state_file: Path) -> DLRM:
    """The (untrained) DLRM that saved configs describe, with the per-token state of
    ``state_file`` (``embedding_state.npz``; may be absent); checkpoints and bundles load
    their weights into it."""
    arrays: dict[str, Any] = {}
    if state_file.exists():
        with np.load(state_file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    emb = build_embedding(EmbeddingSpec.from_config(embedding_config), fmap, **arrays)
    return build_dlrm(DLRMConfig(**model_config), emb, fmap)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the model from the checkpoint's own config and load its weights (eval mode)."""
    path = Path(path)
    ck = path / "checkpoint.pt"
    if not ck.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: {ck.name} is missing")
    payload = torch.load(ck, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{ck}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}; "
            "retrain with this version of lma"
        )
    fmap = FeatureMap.load(path)
    model = rebuild_model(payload["model_config"], payload["embedding_config"], fmap,
                          path / "embedding_state.npz")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{ck}: the weights do not fit the model its config describes ({e}); "
                         "the checkpoint is damaged or from another build: retrain it") from None
    model.eval()
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    config = {k: v for k, v in payload.items() if k != "state_dict"}
    return Checkpoint(model=model, feature_map=fmap, config=config, metrics=metrics, path=path)
