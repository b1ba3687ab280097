"""Self-describing training checkpoints: model config, feature map, weights, metrics, versions.

Layout of a checkpoint folder:
    checkpoint.pt          torch.save of {"format", "model_config", "embedding_config",
                           "state_dict", "versions", "train_config", "history"}; the state dict
                           holds the built key tables of full tables and LMA (``key_table.*``;
                           checkpoints written before hold the sorted vocabulary instead, and
                           the table is built from it at load: :func:`upgrade_checkpoint`
                           stores it once)
    feature_map.json/.npz  the schema and per-field token counts (lma.features.FeatureMap)
    embedding_state.npz    per-token state of the embedding (e.g. LMA signatures), maybe empty
    metrics.json           evaluation results of the run
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
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
           "save_checkpoint", "upgrade_checkpoint"]

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
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "embedding_config": model.embedding.config(),
        "state_dict": model.state_dict(),
        "versions": library_versions(),
        "train_config": _plain(train_config or {}),
        "history": _plain(history or []),
    }
    with _replacing(out) as tmp:
        fmap.save(tmp)
        np.savez(tmp / "embedding_state.npz", **model.embedding.extra_state_arrays())
        torch.save(payload, tmp / "checkpoint.pt")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
    return out


class _replacing:
    """Files written into a temporary folder inside ``out`` and then renamed over the old
    ones: a model loaded from ``out`` maps its files (``mmap=True``), and rewriting a mapped
    file in place would change the weights under it (or fault); a rename leaves the old inode
    to its readers."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".lma-save-", dir=self.out))
        return self.tmp

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                for f in sorted(self.tmp.iterdir()):
                    os.replace(f, self.out / f.name)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
    # Memory-mapped: an export needs the schema and the vocabulary's size, not its tokens.
    fmap = FeatureMap.load(path, mmap=True)
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


def upgrade_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a checkpoint written before key tables were stored so that it holds them:
    the tables are built once, here (at the Criteo-Kaggle vocabulary several GB and tens of
    seconds), instead of at every load (export, evaluation). Weights, configs, versions and the
    other files are kept; ``checkpoint.pt`` records the upgrade. ``out``: write the upgraded
    checkpoint there (the other files are copied) instead of replacing ``path``'s."""
    src = Path(path)
    dst = Path(out) if out is not None else src
    ck = load_checkpoint(src)
    payload = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)
    before = set(payload["state_dict"])
    payload["state_dict"] = ck.model.state_dict()
    payload["upgraded"] = {"stored": sorted(set(payload["state_dict"]) - before),
                           "dropped": sorted(before - set(payload["state_dict"])),
                           "versions": library_versions()}
    with _replacing(dst) as tmp:
        torch.save(payload, tmp / "checkpoint.pt")
        if dst.resolve() != src.resolve():
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name != "checkpoint.pt":
                    shutil.copyfile(f, tmp / f.name)
    return dst
