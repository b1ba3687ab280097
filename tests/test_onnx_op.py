"""ONNX form of the hashed gather: the model-local function equals the torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lma import hashspec
from lma.ops import HashedGatherConfig, hashed_gather, hashed_gather_reference
from model_export import onnx_op

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _keys(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.integers(I64_MIN, I64_MAX, size=shape, dtype=np.int64, endpoint=True)
    extreme = [0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, 0xFFFF, (1 << 32) - 1, 1 << 32, -(1 << 32)]
    n = min(len(extreme), k.size)
    k.reshape(-1)[:n] = extreme[:n]
    return k


@pytest.mark.parametrize("mode", ["lma", "robez"])
@pytest.mark.parametrize("z", [1, 2, 4, 16])
@pytest.mark.parametrize("aligned", [False, True])
def test_function_indices_and_outputs_match_reference(mode: str, z: int, aligned: bool) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=10007, seed=z + 1)
    keys = _keys((33, 26), seed=z)
    want_idx = hashspec.slot_indices(keys.reshape(-1), cfg.params(), cfg.m, z, mode, aligned)

    probe = onnx_op.standalone_model(cfg, indices_only=True)
    onnx.checker.check_model(probe, full_check=True)
    (idx,) = _session(probe).run(None, {"keys": keys})
    assert idx.dtype == np.int64
    assert np.array_equal(idx, want_idx)

    mem = np.random.default_rng(0).standard_normal(cfg.m).astype(np.float32)
    model = onnx_op.standalone_model(cfg, memory=mem)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    (out,) = _session(model).run(None, {"keys": keys})
    a, b, w = cfg.param_tensors()
    ref = hashed_gather_reference(torch.from_numpy(mem), torch.from_numpy(keys), (a, b, w), cfg)
    assert out.shape == (33, 26, 16)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-6, rtol=0)


def test_function_with_other_dims_and_memory_input() -> None:
    cfg = HashedGatherConfig(dim=12, z=3, mode="lma", aligned=False, m=777, n_subkeys=5, seed=9)
    keys = _keys((4, 3), seed=1)
    model = onnx_op.standalone_model(cfg, memory_as_input=True)
    mem = np.arange(cfg.m, dtype=np.float32)
    (out,) = _session(model).run(None, {"memory": mem, "keys": keys})
    want = hashspec.slot_indices(keys.reshape(-1), cfg.params(), cfg.m, 3, "lma", False)
    np.testing.assert_array_equal(out.reshape(-1, 12), want.astype(np.float32))


def test_subkeys_from_w() -> None:
    for t in range(1, 9):
        assert onnx_op.subkeys_from_w(hashspec.make_params(3, 4, t).nibble_weights) == t
    assert onnx_op.subkeys_from_w(np.ones((16, 2), np.int64)) == 0


class _TwoLookups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=4096, seed=1)
        self.c2 = HashedGatherConfig(dim=8, z=1, mode="robez", aligned=True, m=999, seed=2)
        for i, c in enumerate((self.c1, self.c2)):
            a, b, w = c.param_tensors()
            self.register_buffer(f"a{i}", a, persistent=False)
            self.register_buffer(f"b{i}", b, persistent=False)
            self.register_buffer(f"w{i}", w, persistent=False)
        self.m1 = nn.Parameter(torch.randn(self.c1.m))
        self.m2 = nn.Parameter(torch.randn(self.c2.m))
        self.head = nn.Linear(24, 1)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        e1 = hashed_gather(self.m1, keys, (self.a0, self.b0, self.w0), self.c1)
        e2 = hashed_gather(self.m2, keys, (self.a1, self.b1, self.w1), self.c2)
        return self.head(torch.cat([e1, e2], -1).sum(1)).squeeze(-1)


def test_dynamo_export_emits_one_custom_node_per_lookup(tmp_path: Path) -> None:
    model = _TwoLookups().eval()
    keys = torch.from_numpy(_keys((4, 26), seed=3))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    path = tmp_path / "two.onnx"
    proto = onnx_op.export_onnx(
        model, (keys,), path, ["tokens"], ["logits"], dynamic_shapes=({0: batch},)
    )
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.ir_version <= 10
    opsets = {o.domain: o.version for o in loaded.opset_import}
    assert opsets[""] == onnx_op.OPSET and opsets[onnx_op.DOMAIN] == onnx_op.OP_VERSION
    custom = [n for n in loaded.graph.node if n.domain == onnx_op.DOMAIN]
    assert [n.op_type for n in custom] == ["HashedGather", "HashedGather"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in custom]
    by_dim = {a["dim"]: a for a in attrs}
    assert by_dim[16] == {
        "dim": 16,
        "z": 4,
        "t": 8,
        "b": 4,
        "mode": b"lma",
        "aligned": 0,
        "spec_version": 1,
    }
    assert by_dim[8]["mode"] == b"robez" and by_dim[8]["aligned"] == 1 and by_dim[8]["z"] == 1
    assert [(f.domain, f.name) for f in loaded.functions] == [(onnx_op.DOMAIN, "HashedGather")]
    # No node outside the function body uses a non-standard op (no native library needed).
    assert {n.domain for n in loaded.graph.node} <= {"", onnx_op.DOMAIN}
    assert proto.graph.output[0].name == "logits"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 300):
        k = torch.from_numpy(_keys((n, 26), seed=n))
        (y,) = sess.run(None, {"tokens": k.numpy()})
        np.testing.assert_allclose(y, model(k).detach().numpy(), atol=1e-5, rtol=1e-5)


class _Search(nn.Module):
    def __init__(self, seq: torch.Tensor, right: bool) -> None:
        super().__init__()
        self.register_buffer("seq", seq)
        self.right = right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.seq, x, right=self.right)


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000])
@pytest.mark.parametrize("right", [False, True])
def test_searchsorted_translation(tmp_path: Path, n: int, right: bool) -> None:
    rng = np.random.default_rng(n)
    seq = np.sort(rng.integers(-50, 50, size=n)).astype(np.int64)
    x = np.concatenate([seq, rng.integers(-60, 60, size=200), [I64_MIN, I64_MAX]]).astype(np.int64)
    x = x.reshape(1, -1)
    model = _Search(torch.from_numpy(seq), right).eval()
    path = tmp_path / "s.onnx"
    dim = torch.export.Dim("n", min=1, max=1 << 20)
    onnx_op.export_onnx(
        model, (torch.from_numpy(x),), path, ["x"], ["pos"], dynamic_shapes=({1: dim},)
    )
    (pos,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(pos, np.searchsorted(seq, x, side="right" if right else "left"))


def test_external_data_export(tmp_path: Path) -> None:
    """Large models keep their weights in ``<file>.data``; the node, function and t survive."""
    model = _TwoLookups().eval()
    keys = torch.from_numpy(_keys((4, 26), seed=3))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    path = tmp_path / "big.onnx"
    proto = onnx_op.export_onnx(
        model,
        (keys,),
        path,
        ["tokens"],
        ["logits"],
        dynamic_shapes=({0: batch},),
        external_data=True,
    )
    assert (tmp_path / "big.onnx.data").is_file()
    assert proto.ir_version <= 10
    custom = [n for n in proto.graph.node if n.domain == onnx_op.DOMAIN]
    assert len(custom) == 2
    ts = sorted(
        onnx.helper.get_attribute_value(a) for n in custom for a in n.attribute if a.name == "t"
    )
    assert ts == [0, 8]  # t (signature sub-keys) is set for lma nodes only
    assert [(f.domain, f.name) for f in proto.functions] == [(onnx_op.DOMAIN, "HashedGather")]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    k = torch.from_numpy(_keys((5, 26), seed=8))
    (y,) = sess.run(None, {"tokens": k.numpy()})
    np.testing.assert_allclose(y, model(k).detach().numpy(), atol=1e-5, rtol=1e-5)
