"""Model backends: one opened model that turns (dense, tokens) rows into logits.

Each backend is chosen by name (``onnxruntime`` or ``torch``) and imported only then, so a
server running onnxruntime never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lma.bundle import DEFAULT_WEIGHTS

BACKENDS = ("onnxruntime", "torch")


@dataclass
class Placement:
    """Where a backend runs and where the model's embedding memory lives."""

    device: str  # "cpu" or "cuda:N"
    providers: list[str]  # execution providers the session uses (or the torch device)
    memory: str  # "host" or "cuda:N"
    memory_bytes: dict[str, int] = field(default_factory=dict)
    engine: str = ""  # what runs: "onnx", or the torch "program" (model.pt2) / "eager" model
    # Where the host holds the weights: "private" (read into the process's memory), "mmap"
    # (mapped from weights.safetensors), or who loaded them ("onnxruntime", "program", "cuda:N").
    weights: str = ""
    # onnxruntime: whether the ai.lma nodes run with the native ops library (lma.ort_ops) or
    # as their ONNX functions; torch: whether the lma ops run compiled kernels (the C++
    # extension, Triton on CUDA) or the pure-torch reference.
    native_ops: bool = False


class Backend(Protocol):
    name: str
    placement: Placement

    def run(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """dense (B, n_dense) float32, tokens (B, S) int64 -> logits (B,) float32.

        Called from one thread per model at a time (the batcher's), but safe from several."""
        ...

    def close(self) -> None: ...


def open_backend(name: str, bundle: Any, device: str = "cpu", threads: int = 0,
                 weights: str = DEFAULT_WEIGHTS) -> Backend:
    """The bundle's model opened with backend ``name`` on ``device`` (cpu, cuda[:N], auto),
    its weights held as ``weights`` says (``private`` or ``mmap``, lma.bundle.WEIGHT_MODES)."""
    if name == "onnxruntime":
        from service.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device, threads, weights)
    if name == "torch":
        from service.backends.torch import TorchBackend

        return TorchBackend(bundle, device, threads, weights)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
