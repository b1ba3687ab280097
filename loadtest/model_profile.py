"""Where a bundle's ONNX model spends its time: key resolution, the embedding gather, and the rest
(pooling, interaction, MLPs), for ``lma bench serve``'s profile breakdown.

onnxruntime inlines the model-local functions (``ai.lma::KeyLookup``, ``ai.lma::HashedGather``,
``ai.lma::HotGather``) into anonymous nodes where they run as functions, so its node profiler
cannot say which node belonged to which lookup. Instead the model is cut: one copy ends at the
outputs of its key lookups (token -> row or signature), one at the embedding rows (after the
float16 -> float32 cast where there is one), and each copy keeps only the nodes its outputs
need. Timed on the same encoded rows with the same
session options, key resolution is the first copy's time, the gather the second's minus the
first's, and the rest the whole model's minus the second's. Each copy's time includes one
``session.run`` call's fixed cost (tens of microseconds), so at one row the split is coarse.
The sessions are made as the service makes them: on the CPU the ``ai.lma`` nodes run on the
native ops library where it is available (``lma.ort_ops``; ``native_ops`` says whether they did).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("key_resolution", "gather", "mlp_and_rest")
_DOMAIN = "ai.lma"


def _cut_points(model: Any) -> dict[str, list[str]]:
    """Output names where each cut ends: ``keys`` (the embedding's key lookups; empty when the
    kind has none, e.g. hash and robez) and ``gather`` (the embedding rows)."""
    inits = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    table = [n for n in model.graph.node
             if n.input and n.input[0] in inits and n.input[0].startswith("embedding.")
             and n.op_type in ("Gather", "HashedGather", "HotGather")]
    gather = []
    for n in table:
        out = n.output[0]
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Cast":
            out = after[0].output[0]
        gather.append(out)
    keys = [n.output[0] for n in model.graph.node
            if (n.domain, n.op_type) == (_DOMAIN, "KeyLookup")]
    return {"keys": keys, "gather": gather}


def _cut(model: Any, outputs: Sequence[str]) -> Any:
    """A copy of ``model`` whose outputs are ``outputs``, with only the nodes they need."""
    import onnx
    from onnx import helper

    produced = {o: n for n in model.graph.node for o in n.output}
    need, stack, keep = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        node = produced.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = [n for n in model.graph.node if id(n) in keep]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    inits = [i for i in model.graph.initializer if i.name in need]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs)
    return m


class StageModels:
    """Sessions of the cut copies of a bundle's model.onnx (CPU provider, ``threads`` threads)."""

    def __init__(self, bundle: Any, threads: int = 1):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(bundle.onnx_path), load_external_data=False)
        self.cuts = _cut_points(model)
        if not self.cuts["gather"]:
            raise ValueError(f"{bundle.onnx_path}: no embedding gather found to cut at")
        self._dir = tempfile.TemporaryDirectory(prefix="lma-profile-")
        d = Path(self._dir.name)
        # The cut copies point into the bundle's weight file as the model does (external data
        # by relative location), through hard links beside them (onnxruntime refuses symbolic
        # links that leave the model's folder); a copy where the folder is on another disk.
        for f in Path(bundle.path).iterdir():
            if f.is_file() and f.name != "model.onnx":
                try:
                    os.link(f, d / f.name)
                except OSError:
                    shutil.copyfile(f, d / f.name)
        from lma import ort_ops

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.native_ops = ort_ops.register(opts, ["CPUExecutionProvider"])
        self.sessions: dict[str, Any] = {}
        for name in ("keys", "gather"):
            if not self.cuts[name]:
                continue
            path = d / f"cut_{name}.onnx"
            onnx.save_model(_cut(model, self.cuts[name]), str(path))
            self.sessions[name] = ort.InferenceSession(str(path), sess_options=opts,
                                                       providers=["CPUExecutionProvider"])
        self.full = ort.InferenceSession(str(bundle.onnx_path), sess_options=opts,
                                         providers=["CPUExecutionProvider"])

    def close(self) -> None:
        self.sessions.clear()
        self._dir.cleanup()

    def _feed(self, sess: Any, dense: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        names = {i.name for i in sess.get_inputs()}
        return {k: v for k, v in (("dense", dense), ("tokens", tokens)) if k in names}

    def profile(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], seconds: float
                ) -> dict[str, float]:
        """Median ms per call of each stage over ``batches`` (cycled, about ``seconds`` per
        session, interleaved so contention hits every session alike)."""
        sessions = [("keys", self.sessions.get("keys")), ("gather", self.sessions["gather"]),
                    ("model", self.full)]
        times: dict[str, list[float]] = {k: [] for k, s in sessions if s is not None}
        for d, t in batches[:2]:  # warm caches and lazy allocations
            for _, s in sessions:
                if s is not None:
                    s.run(None, self._feed(s, d, t))
        stop = time.perf_counter() + 3 * seconds
        i = 0
        while time.perf_counter() < stop or i < 5:
            d, t = batches[i % len(batches)]
            for k, s in sessions:
                if s is None:
                    continue
                feed = self._feed(s, d, t)
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
            i += 1
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        keys = med.get("keys", 0.0)
        return {"key_resolution": keys,
                "gather": max(med["gather"] - keys, 0.0),
                "mlp_and_rest": max(med["model"] - med["gather"], 0.0),
                "model": med["model"], "calls": i}
