"""Offline batch scoring with a bundle: (dense, tokens) rows -> click probabilities."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_export.bundle import Bundle, load_bundle

logger = logging.getLogger(__name__)

BATCH = 65536


@dataclass
class Predictor:
    bundle: Bundle
    engine: str  # "onnx" | "program" | "eager"
    _fn: Any = None

    @classmethod
    def open(cls, path: str | Path, engine: str = "onnx") -> Predictor:
        b = load_bundle(path)
        p = cls(b, engine)
        if engine == "onnx":
            sess = b.onnx_session()
            p._fn = lambda d, t: sess.run(None, {"dense": d, "tokens": t})[0]
        elif engine in ("program", "eager"):
            import torch

            mod = b.program().module() if engine == "program" else b.eager_model()

            def run(d: np.ndarray, t: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return mod(torch.from_numpy(d), torch.from_numpy(t)).numpy()

            p._fn = run
        else:
            raise ValueError(f"engine must be onnx, program or eager, got {engine!r}")
        return p

    def check_schema(self, schema: Any) -> None:
        """Refuse rows whose shape does not fit the model; warn when the schema differs."""
        inputs = {i["name"]: i for i in self.bundle.manifest["inputs"]}
        n_dense, n_slots = inputs["dense"]["shape"][1], inputs["tokens"]["shape"][1]
        if len(schema.dense) != n_dense or schema.n_token_slots != n_slots:
            raise ValueError(
                f"the data has {len(schema.dense)} dense fields and {schema.n_token_slots} token "
                f"slots; the bundle's model expects {n_dense} and {n_slots} (pass --schema?)"
            )
        want = self.bundle.feature_map().schema.to_dict()
        if schema.to_dict() != want:
            logger.warning(
                "the data's schema differs from the one the model was trained with "
                "(same shapes, so scoring goes on)"
            )

    def logits(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """dense (N, n_dense), tokens (N, S) -> logits (N,) float32, in input order."""
        dense = np.ascontiguousarray(dense, np.float32)
        tokens = np.ascontiguousarray(tokens, np.int64)
        out = np.empty(len(tokens), np.float32)
        for s in range(0, len(tokens), BATCH):
            out[s : s + BATCH] = self._fn(dense[s : s + BATCH], tokens[s : s + BATCH]).reshape(-1)
        return out

    def predict(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Click probabilities (N,) float64."""
        return 1.0 / (1.0 + np.exp(-self.logits(dense, tokens).astype(np.float64)))
