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
from lma.features import FeatureMap
from lma.jsonio import json_default
from lma.model import DLRM
from lma.rebuild import rebuild_model

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "rebuild_model",
           "save_checkpoint"]

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
        "torch": str(torch.__version__),  # a plain str: weights_only loads take no TorchVersion
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _plain(o: Any) -> Any:
    """Containers of str/int/float/bool/None only, which ``torch.load(weights_only=True)`` reads:
    numpy scalars become Python numbers, paths strings."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_plain(v) for v in o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return o


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
            "train_config": _plain(train_config or {}),
            "history": _plain(history or []),
        },
        out / "checkpoint.pt",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
    return out


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the model from the checkpoint's own config and load its weights (eval mode)."""
    path = Path(path)
    ck = path / "checkpoint.pt"
    if not ck.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: {ck.name} is missing")
    # weights_only: nothing is unpickled but tensors and plain containers; mmap: the weights
    # stay in the file's pages until used (the model takes them without a copy).
    try:
        # Checkpoints written before versions were plain strings hold a TorchVersion (a str).
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            payload = torch.load(ck, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        raise ValueError(f"{ck}: not a readable checkpoint ({e})") from None
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{ck}: checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}; "
            "retrain with this version of lma"
        )
    fmap = FeatureMap.load(path)
    try:
        model = rebuild_model(payload["model_config"], payload["embedding_config"], fmap,
                              path / "embedding_state.npz", weights=payload["state_dict"])
    except ValueError as e:
        raise ValueError(f"{ck}: {e}; the checkpoint is damaged or from another build: "
                         "retrain it") from None
    model.eval()
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    config = {k: v for k, v in payload.items() if k != "state_dict"}
    return Checkpoint(model=model, feature_map=fmap, config=config, metrics=metrics, path=path)
