"""The torch backend: the bundle's exported program (``model.pt2``) with the native
``lma::hashed_gather`` op. On CUDA the memory, the signature table and the MLPs are moved to the
device, so key resolution and the gather run there. torch is imported here only."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

import lma.ops  # noqa: F401  (registers lma::hashed_gather before the program is loaded)
from lma.bundle import DEFAULT_WEIGHTS, check_weights_mode
from service.backends import Placement, cuda_index

logger = logging.getLogger(__name__)


class TorchBackend:
    name = "torch"

    def __init__(self, bundle: Any, device: str = "cpu", threads: int = 0,
                 weights: str = DEFAULT_WEIGHTS):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r}: torch sees no CUDA device here")
            device = f"cuda:{cuda_index(device)}"
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # Format 2 bundles carry model.pt2 only when exported with --torch-program; without it,
        # the eager model (same lma ops, weights from weights.safetensors, private or mapped as
        # ``weights`` says) runs. The program holds its own copy (torch.export.load reads it).
        check_weights_mode(weights)
        if bundle.program_path is not None:
            self.module = torch.export.load(str(bundle.program_path)).module().to(self.device)
            engine, held = "program", "program"
        else:
            self.module = bundle.eager_model(weights).to(self.device)
            engine, held = "eager", weights if bundle.format == 2 else "program"
        tensors = [*self.module.parameters(), *self.module.buffers()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        where = {str(t.device) for t in tensors}
        memory = device if device != "cpu" else "host"
        if where - {device}:
            logger.warning("torch backend: some weights are not on %s: %s", device, sorted(where))
        self.placement = Placement(
            device=device,
            providers=[f"torch:{device}"],
            memory=memory,
            memory_bytes={"weights_and_buffers": int(nbytes)},
            engine=engine,
            weights=held if device == "cpu" else device,
            native_ops=_native_kernels(device),
        )

    @torch.inference_mode()
    def run(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        d = torch.from_numpy(np.ascontiguousarray(dense, np.float32)).to(self.device, non_blocking=True)
        t = torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(self.device, non_blocking=True)
        return self.module(d, t).float().cpu().numpy()

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _native_kernels(device: str) -> bool:
    """Whether the lma ops run compiled kernels here: the C++ extension on the CPU (else the
    pure-torch reference), Triton on CUDA where it imports."""
    from lma.ops import _native, _op

    if device == "cpu":
        return _native.native_module() is not None
    return _op.triton_module() is not None
