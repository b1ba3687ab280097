"""Offline batch scoring with a bundle; the implementation lives in :mod:`lma.predictor`."""

from lma.predictor import BATCH, ENGINES, Predictor

__all__ = ["BATCH", "ENGINES", "Predictor"]
