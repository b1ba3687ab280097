"""JSON helpers shared by checkpoints, metrics and bundle manifests (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars, paths and tuples in metrics and manifests."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
