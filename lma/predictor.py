"""Scoring with a bundle: (dense, tokens) rows -> logits or click probabilities.

One prediction path for offline scoring (``lma predict``) and serving. Engines:

- ``onnx``: ``model.onnx`` in onnxruntime (imported when opened; needs nothing else);
- ``program``: the ``torch.export`` program, when the bundle has one;
- ``eager``: the DLRM rebuilt in eager torch from the bundle's weights.

The torch engines import torch when opened. A :class:`Predictor` is safe to call from several
threads at once: onnxruntime's ``InferenceSession.run`` is thread-safe, and the torch engines run
an eval-mode module under ``torch.inference_mode`` (thread-local), which mutates no shared state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lma.bundle import (
    DEFAULT_WEIGHTS,
    Bundle,
    BundleError,
    check_weights_mode,
    load_bundle,
)

logger = logging.getLogger(__name__)

BATCH = 65536
ENGINES = ("onnx", "program", "eager")
# The sample's logits were computed by torch eager at export; another engine or provider may
# differ by float rounding (TOLERANCE of lma verify is 1e-5), a broken one by much more.
WARMUP_TOLERANCE = 1e-3


CPU_EP = "CPUExecutionProvider"


def onnx_session(bundle: Bundle, providers: Sequence[Any] | None = None,
                 session_options: Any = None, weights: str = DEFAULT_WEIGHTS,
                 native_ops: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime session of ``bundle``'s ``model.onnx`` and what must outlive it.

    ``weights`` (:data:`lma.bundle.WEIGHT_MODES`): with ``"mmap"`` onnxruntime loads the
    external initializers itself (it maps ``weights.safetensors``); with ``"private"`` they
    are read into arrays of this process's memory and handed over with ``add_initializer``,
    which onnxruntime uses without copying and instead of reading the file (it still checks
    that the file exists). The returned dict holds those arrays and their OrtValues: keep it as
    long as the session. Private applies to a format 2 bundle on the CPU provider alone; on
    another provider (CUDA) the weights are copied to the device either way, and format 1
    bundles carry theirs inside ``model.onnx``: onnxruntime then loads them itself (logged).

    ``native_ops``: whether the ``ai.lma`` nodes run with the C++ kernels of the onnxruntime
    LMA ops library (:mod:`lma.ort_ops`; CPU provider only) instead of their ONNX functions:
    None follows ``LMA_ORT_NATIVE_OPS`` (default ``auto``: where the library is available),
    True requires it, False never. ``owned["native_ops"]`` says what the session got.
    """
    import onnxruntime as ort

    from lma import ort_ops

    check_weights_mode(weights)
    providers = list(providers) if providers else [CPU_EP]
    names = [p if isinstance(p, str) else p[0] for p in providers]
    so = session_options if session_options is not None else ort.SessionOptions()
    owned: dict[str, Any] = {"mode": weights}
    if weights == "mmap" and bundle.format == 2:
        # onnxruntime's own message for a damaged file names an initializer, not the file:
        # check the file's header and sizes first (maps are made and dropped, nothing read).
        bundle.onnx_initializers(private=False)
    if weights == "private":
        if names != [CPU_EP] or bundle.format == 1:
            why = "format 1 bundle" if bundle.format == 1 else f"providers {names}"
            logger.info("%s: weights loaded by onnxruntime (%s), not into private memory",
                        bundle.path, why)
            owned["mode"] = "onnxruntime"
        else:
            arrays = bundle.onnx_initializers(private=True)
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
            for k, v in values.items():
                so.add_initializer(k, v)
            owned.update(arrays=arrays, values=values,
                         private_bytes=int(sum(a.nbytes for a in arrays.values())))
    if native_ops is None:
        owned["native_ops"] = ort_ops.register(so, providers)
    elif native_ops:
        if names != [CPU_EP]:
            raise ValueError(f"native_ops=True needs the CPU provider alone, got {names}")
        ort_ops.add_to(so)
        owned["native_ops"] = True
    else:
        owned["native_ops"] = False
    try:
        sess = ort.InferenceSession(str(bundle.onnx_path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{bundle.onnx_path}: onnxruntime cannot load the model ({exc})") from exc
    return sess, owned


@dataclass
class Predictor:
    bundle: Bundle
    engine: str  # "onnx" | "program" | "eager"
    _fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = field(repr=False)
    session: Any = field(default=None, repr=False)  # the onnxruntime session (onnx engine)
    module: Any = field(default=None, repr=False)  # the torch module (torch engines)
    device: str = "cpu"
    open_seconds: float = 0.0
    warmup_seconds: float | None = None
    # Where the weights live: "private", "mmap", or "onnxruntime" / "program" where the
    # engine loads them itself (see open); _owned keeps private arrays alive with the session.
    weights: str = ""
    # onnx engine: whether the ai.lma nodes run with the native ops library (lma.ort_ops)
    native_ops: bool = False
    _owned: Any = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        path: str | Path | Bundle,
        engine: str = "onnx",
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
        intra_op_threads: int | None = None,
        device: str = "cpu",
        verify_checksums: bool = True,
        weights: str = DEFAULT_WEIGHTS,
        native_ops: bool | None = None,
    ) -> Predictor:
        """Open ``path`` (a bundle folder, or an already loaded :class:`Bundle`, whose checksums
        are then not hashed again) with ``engine``.

        onnx: ``providers`` (default ``["CPUExecutionProvider"]``) and ``session_options`` (an
        ``onnxruntime.SessionOptions``) go to the session; ``intra_op_threads`` sets its
        intra-op thread count. Torch engines: ``device`` ("cpu", "cuda", "cuda:1", ...);
        ``intra_op_threads`` calls ``torch.set_num_threads`` (process-wide).

        ``weights`` (``"private"`` or ``"mmap"``, :data:`lma.bundle.WEIGHT_MODES`): whether the
        onnx and eager engines read the weights into this process's memory or map
        ``weights.safetensors`` (see :func:`onnx_session`). The program engine always holds
        its own copy (``torch.export.load`` reads ``model.pt2`` into memory). ``native_ops``
        (onnx engine): see :func:`onnx_session`.
        """
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        check_weights_mode(weights)
        t0 = time.perf_counter()
        b = path if isinstance(path, Bundle) else load_bundle(path, verify_checksums)
        if engine == "onnx":
            p = cls._open_onnx(b, providers, session_options, intra_op_threads, weights,
                               native_ops)
        else:
            p = cls._open_torch(b, engine, device, intra_op_threads, weights)
        p.open_seconds = time.perf_counter() - t0
        return p

    @classmethod
    def _open_onnx(cls, b: Bundle, providers: Sequence[Any] | None, session_options: Any,
                   intra_op_threads: int | None, weights: str,
                   native_ops: bool | None = None) -> Predictor:
        import onnxruntime as ort

        so = session_options if session_options is not None else ort.SessionOptions()
        if intra_op_threads is not None:
            so.intra_op_num_threads = int(intra_op_threads)
        sess, owned = onnx_session(b, providers, so, weights, native_ops)

        def run(d: np.ndarray, t: np.ndarray) -> np.ndarray:
            return sess.run(None, {"dense": d, "tokens": t})[0]

        return cls(b, "onnx", run, session=sess, weights=owned["mode"],
                   native_ops=owned["native_ops"], _owned=owned)

    @classmethod
    def _open_torch(cls, b: Bundle, engine: str, device: str,
                    intra_op_threads: int | None, weights: str) -> Predictor:
        import torch

        if intra_op_threads is not None:
            torch.set_num_threads(int(intra_op_threads))
        if engine == "program":
            mod, held = b.program().module(), "program"
        else:
            held = weights if b.format == 2 else "program"
            mod = b.eager_model(weights)
        dev = torch.device(device)
        if dev.type != "cpu":
            mod, held = mod.to(dev), str(dev)

        def run(d: np.ndarray, t: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = mod(torch.from_numpy(d).to(dev), torch.from_numpy(t).to(dev))
                return out.float().cpu().numpy()

        return cls(b, engine, run, module=mod, device=str(dev), weights=held)

    def providers_in_use(self) -> list[str]:
        """What actually runs the model: onnxruntime's providers as the session reports them, or
        ``torch:<device>`` for the torch engines."""
        if self.session is not None:
            return list(self.session.get_providers())
        return [f"torch:{self.device}"]

    def check_schema(self, schema: Any) -> None:
        """Refuse rows whose shape does not fit the model; warn when the schema differs."""
        n_dense, n_slots = self.bundle.n_dense, self.bundle.n_token_slots
        if len(schema.dense) != n_dense or schema.n_token_slots != n_slots:
            raise ValueError(
                f"the data has {len(schema.dense)} dense fields and {schema.n_token_slots} token "
                f"slots; the bundle's model expects {n_dense} and {n_slots} (pass --schema?)"
            )
        if schema.to_dict() != self.bundle.schema.to_dict():
            logger.warning(
                "the data's schema differs from the one the model was trained with "
                "(same shapes, so scoring goes on)"
            )

    def logits(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """dense (N, n_dense), tokens (N, S) -> logits (N,) float32, in input order."""
        dense = np.ascontiguousarray(dense, np.float32)
        tokens = np.ascontiguousarray(tokens, np.int64)
        if dense.ndim != 2 or tokens.ndim != 2 or len(dense) != len(tokens):
            raise ValueError(
                f"dense and tokens must be 2-D with one row each per example, got shapes "
                f"{dense.shape} and {tokens.shape}"
            )
        if dense.shape[1] != self.bundle.n_dense or tokens.shape[1] != self.bundle.n_token_slots:
            raise ValueError(
                f"rows have {dense.shape[1]} dense / {tokens.shape[1]} token columns; the model "
                f"expects {self.bundle.n_dense} / {self.bundle.n_token_slots}"
            )
        out = np.empty(len(tokens), np.float32)
        for s in range(0, len(tokens), BATCH):
            out[s : s + BATCH] = self._fn(dense[s : s + BATCH], tokens[s : s + BATCH]).reshape(-1)
        return out

    def predict(self, dense: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Click probabilities (N,) float64."""
        return 1.0 / (1.0 + np.exp(-self.logits(dense, tokens).astype(np.float64)))

    def warmup(self, rows: int = 256, check: bool = True) -> float:
        """Score ``rows`` rows of the bundle's sample (repeated when it holds fewer) through the
        whole path and return the seconds it took. With ``check``, the sample's logits must match
        those computed at export (within ``WARMUP_TOLERANCE``), else :class:`BundleError`."""
        sample = self.bundle.sample()
        n = len(sample["tokens"])
        if n == 0:
            raise BundleError(f"{self.bundle.path}: the sample holds no rows to warm up with")
        idx = np.arange(max(1, int(rows))) % n
        t0 = time.perf_counter()
        got = self.logits(sample["dense"][idx], sample["tokens"][idx])
        self.warmup_seconds = time.perf_counter() - t0
        if check:
            want = sample["logits"].astype(np.float64)[idx]
            diff = np.abs(got.astype(np.float64) - want)
            bad = ~(diff <= WARMUP_TOLERANCE * np.maximum(1.0, np.abs(want)))
            if bad.any():
                raise BundleError(
                    f"{self.bundle.path}: the {self.engine} engine ({', '.join(self.providers_in_use())}) "
                    f"gives logits up to {float(np.nanmax(diff)):.3g} away from those saved at export "
                    f"on {int(bad.sum())} of {len(idx)} sample rows"
                )
        return self.warmup_seconds
