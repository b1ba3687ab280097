"""The onnxruntime backend: CPU execution provider, or CUDA with inputs and outputs bound on the
device (IOBinding) where the ``onnxruntime-gpu`` package is installed."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort

from lma.bundle import DEFAULT_WEIGHTS, WEIGHTS_FILE
from lma.predictor import onnx_session
from service.backends import Placement, cuda_index

logger = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Any, device: str = "cpu", threads: int = 0,
                 weights: str = DEFAULT_WEIGHTS):
        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and CUDA_EP in available)
        if want_cuda and CUDA_EP not in available:
            raise ValueError(
                f"device {device!r}: onnxruntime has no CUDA provider here (available: "
                f"{available}); install the serve-gpu extra (onnxruntime-gpu) or use --device cpu"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.device_id = cuda_index(device) if want_cuda else None
        if want_cuda:
            # The model's memory is one large initializer: allocate it as requested, not in
            # power-of-two arena chunks.
            opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
            providers: list[Any] = [
                (CUDA_EP, {"device_id": self.device_id, "arena_extend_strategy": "kSameAsRequested"}),
                CPU_EP,
            ]
        else:
            providers = [CPU_EP]
        path = bundle.onnx_path
        # On CUDA the weights are copied to the device whatever the host does with them.
        self.session, self._owned = onnx_session(bundle, providers, opts, weights)
        used = self.session.get_providers()
        if want_cuda and CUDA_EP not in used:
            raise RuntimeError(f"{path}: onnxruntime did not register the CUDA provider ({used})")
        on_cuda = want_cuda
        dev = f"cuda:{self.device_id}" if on_cuda else "cpu"
        self.placement = Placement(
            device=dev,
            providers=used,
            memory=dev if on_cuda else "host",
            # model.onnx, plus the weights file it points into (bundle format 2).
            memory_bytes={"model_files": path.stat().st_size + (
                w.stat().st_size if (w := bundle.file(WEIGHTS_FILE)).is_file() else 0),
                **({"private_weights": self._owned["private_bytes"]}
                   if "private_bytes" in self._owned else {})},
            engine="onnx",
            weights=dev if on_cuda else self._owned["mode"],
            native_ops=self._owned["native_ops"],
        )
        self._output = self.session.get_outputs()[0].name

    def run(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        dense = np.ascontiguousarray(dense, np.float32)
        tokens = np.ascontiguousarray(tokens, np.int64)
        if self.device_id is None:
            return self.session.run([self._output], {"dense": dense, "tokens": tokens})[0]
        io = self.session.io_binding()
        io.bind_ortvalue_input("dense", ort.OrtValue.ortvalue_from_numpy(dense, "cuda", self.device_id))
        io.bind_ortvalue_input("tokens", ort.OrtValue.ortvalue_from_numpy(tokens, "cuda", self.device_id))
        io.bind_output(self._output, "cuda", self.device_id)
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self._owned = {}
