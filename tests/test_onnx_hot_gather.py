"""ONNX form of ``lma::hot_gather``: the HotGather function equals hot rows / the hashed gather,
bit for bit, in onnxruntime's CPU provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lma import hashspec
from lma.ops import HashedGatherConfig, hashed_gather_reference
from model_export import cuda_kernels, onnx_op

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME = [0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, 0xFFFF, (1 << 32) - 1, 1 << 32, -(1 << 32)]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


def _reference(cfg: HashedGatherConfig, memory: np.ndarray, hot: np.ndarray, index: np.ndarray,
               keys: np.ndarray) -> np.ndarray:
    """hot[index] where index >= 0, else memory at the spec's slots (``hashspec``, numpy)."""
    slots = hashspec.slot_indices(keys.reshape(-1), cfg.params(), cfg.m, cfg.z, cfg.mode,
                                  cfg.aligned)
    out = memory[slots]  # (N, dim)
    flat = index.reshape(-1)
    warm = flat >= 0
    out[warm] = hot[flat[warm]]
    return out.reshape(*keys.shape, cfg.dim)


def _case(rng: np.random.Generator, rows: int, h: int, cold: float) -> tuple[np.ndarray, np.ndarray]:
    keys = rng.integers(I64_MIN, I64_MAX, size=(rows, 26), dtype=np.int64, endpoint=True)
    n = min(len(EXTREME), keys.size)
    keys.reshape(-1)[:n] = EXTREME[:n]
    index = rng.integers(0, max(h, 1), size=(rows, 26)).astype(np.int64)
    mask = rng.random((rows, 26)) < cold
    if h == 0:
        mask[:] = True
    index[mask] = -1
    return index, keys


CONFIGS = [(mode, z, aligned) for mode in ("lma", "robez")
           for z, aligned in ((1, False), (4, False), (4, True), (16, False), (16, True))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode,z,aligned", CONFIGS)
def test_hot_gather_function_is_exact(dtype: type, mode: str, z: int, aligned: bool) -> None:
    """One session (memory and hot as inputs) over H = 0 / 1 / 300 and 0 / some / all cold."""
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=10007, seed=z + 3)
    rng = np.random.default_rng(z + 10 * aligned)
    memory = rng.standard_normal(cfg.m).astype(dtype)
    model = onnx_op.hot_standalone_model(cfg, memory, np.zeros((1, 16), dtype), as_inputs=True)
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    seen = set()
    for h in (0, 1, 300):
        hot = rng.standard_normal((h, 16)).astype(dtype)
        for cold in (0.0, 0.12, 1.0):
            for rows in (1, 1000):
                index, keys = _case(rng, rows, h, cold)
                (y,) = sess.run(None, {"memory": memory, "hot": hot, "index": index, "keys": keys})
                want = _reference(cfg, memory, hot, index, keys)
                assert y.dtype == dtype and y.shape == (rows, 26, 16)
                assert np.array_equal(_bits(y), _bits(want)), (h, cold, rows)
                seen.add(int((index < 0).sum() == 0) - int((index >= 0).sum() == 0))
    assert seen == {-1, 0, 1}  # all cold, mixed and none cold were all run


def test_cold_rows_equal_the_torch_reference() -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=4099, seed=5)
    rng = np.random.default_rng(1)
    memory = rng.standard_normal(cfg.m).astype(np.float32)
    hot = rng.standard_normal((40, 16)).astype(np.float32)
    index, keys = _case(rng, 200, 40, 0.3)
    (y,) = _session(onnx_op.hot_standalone_model(cfg, memory, hot)).run(
        None, {"index": index, "keys": keys})
    ref = hashed_gather_reference(torch.from_numpy(memory), torch.from_numpy(keys),
                                  cfg.param_tensors(), cfg).numpy()
    cold = index < 0
    assert cold.any() and (~cold).any()
    assert np.array_equal(_bits(y[cold]), _bits(ref[cold]))
    assert np.array_equal(_bits(y[~cold]), _bits(hot[index[~cold]]))


@pytest.mark.parametrize("h", [0, 1, 107])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_initializer_tables(h: int, dtype: type) -> None:
    """hot and memory as initializers (as exported): the padded hot table is a folded constant."""
    cfg = HashedGatherConfig(dim=8, z=2, mode="lma", aligned=True, m=3001, seed=7)
    rng = np.random.default_rng(h)
    memory = rng.standard_normal(cfg.m).astype(dtype)
    hot = rng.standard_normal((h, 8)).astype(dtype)
    sess = _session(onnx_op.hot_standalone_model(cfg, memory, hot))
    for cold in (0.0, 0.5, 1.0):
        for rows in (1, 1000):
            index, keys = _case(rng, rows, h, cold)
            (y,) = sess.run(None, {"index": index, "keys": keys})
            assert np.array_equal(_bits(y), _bits(_reference(cfg, memory, hot, index, keys)))


def test_function_calls_the_hashed_gather_function() -> None:
    """One copy of the hash body: HotGather calls HashedGather, and both are in the model."""
    fn = onnx_op.hot_function_proto()
    calls = [n for n in fn.node if n.domain == onnx_op.DOMAIN]
    assert [n.op_type for n in calls] == [onnx_op.OP_TYPE]
    assert {a.name: a.ref_attr_name for a in calls[0].attribute} == {a: a for a in onnx_op.ATTRIBUTES}
    assert not any(n.op_type == "Gemm" for n in fn.node)
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=999, seed=1)
    model = onnx_op.hot_standalone_model(cfg, np.zeros(999, np.float32), np.zeros((2, 16), np.float32))
    assert {f.name for f in model.functions} == {onnx_op.HOT_OP_TYPE, onnx_op.OP_TYPE}


def test_bad_hot_table_is_refused() -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=999, seed=1)
    with pytest.raises(ValueError, match="hot"):
        onnx_op.hot_standalone_model(cfg, np.zeros(999, np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        onnx_op.hot_standalone_model(cfg, np.zeros(999, np.float32), np.zeros((2, 16), np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode,z,aligned", [("lma", 1, False), ("lma", 4, True), ("robez", 16, False)])
def test_hot_gather_function_has_cuda_kernels(dtype: type, mode: str, z: int, aligned: bool) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=4099, seed=2)
    for as_inputs in (False, True):
        model = onnx_op.hot_standalone_model(cfg, np.zeros(cfg.m, dtype), np.zeros((3, 16), dtype),
                                             as_inputs=as_inputs)
        assert cuda_kernels.cuda_problems(model) == []
        census = cuda_kernels.op_type_census(model)
        assert census["NonZero"] == 1 and census["ScatterND"] == 1 and census["Gather"] == 1


# ---------------------------------------------------------------- torch.onnx export of lma::hot_gather


def _hot_module(cfg: HashedGatherConfig, h: int, dtype: torch.dtype) -> torch.nn.Module:
    """One hot_gather lookup (tests/test_hot_gather.py's module) over random tables."""
    from tests.test_hot_gather import _Hot

    g = torch.Generator().manual_seed(h)
    memory = torch.randn(cfg.m, generator=g).to(dtype)
    return _Hot(cfg, memory, torch.randn(h, cfg.dim, generator=g).to(dtype))


@pytest.mark.parametrize("mode,z,h,dtype", [("lma", 4, 50, torch.float32),
                                            ("robez", 1, 0, torch.float32),
                                            ("lma", 16, 7, torch.float16)])
def test_export_emits_one_hot_gather_node(tmp_path: Path, mode: str, z: int, h: int,
                                          dtype: torch.dtype) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=False, m=5003, seed=4)
    module = _hot_module(cfg, h, dtype).eval()
    rng = np.random.default_rng(2)
    index, keys = _case(rng, 4, h, 0.3)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    path = tmp_path / "hot.onnx"
    onnx_op.export_onnx(module, (torch.from_numpy(index), torch.from_numpy(keys)), path,
                        ["index", "keys"], ["rows"], dynamic_shapes=({0: batch}, {0: batch}))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    custom = [n for n in model.graph.node if n.domain == onnx_op.DOMAIN]
    assert [n.op_type for n in custom] == [onnx_op.HOT_OP_TYPE]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
    assert attrs == {"dim": 16, "z": z, "t": 8 if mode == "lma" else 0, "b": 4,
                     "mode": mode.encode(), "aligned": 0, "spec_version": 1}
    assert sorted(f.name for f in model.functions) == [onnx_op.OP_TYPE, onnx_op.HOT_OP_TYPE]
    assert cuda_kernels.cuda_problems(model) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for rows, cold in ((1, 0.0), (1, 1.0), (300, 0.12), (1000, 1.0)):
            index, keys = _case(rng, rows, h, cold)
            (y,) = sess.run(None, {"index": index, "keys": keys})
            want = module(torch.from_numpy(index), torch.from_numpy(keys)).numpy()
            assert y.dtype == want.dtype and np.array_equal(_bits(y), _bits(want)), (rows, cold)


def _hot_dlrm(dtype: str) -> torch.nn.Module:
    from lma.embeddings import EMBEDDINGS, EmbeddingSpec, build_embedding
    from lma.features import FeatureMap
    from lma.model import DLRMConfig, build_dlrm
    from lma.schema import CategoricalField, Schema

    rng = np.random.default_rng(0)
    sizes = (40, 300, 7)
    cats = tuple(CategoricalField(f"f{i}") for i in range(len(sizes)))
    schema = Schema(name="t", label="y", dense=(), categorical=cats)
    toks = [np.sort(rng.choice(2**62, n, replace=False)).astype(np.int64) + i
            for i, n in enumerate(sizes)]
    fmap = FeatureMap(schema, toks, [rng.integers(1, 10, n) for n in sizes], n_rows=1000)
    spec = EmbeddingSpec(kind="lma", dim=8, n_params=fmap.full_table_rows(1) * 8 // 4, seed=1,
                         options={"z": 2})
    train = np.stack([rng.choice(t, 400) for t in fmap.tokens], axis=1)
    emb = build_embedding(spec, fmap, **EMBEDDINGS["lma"].prepare(spec, fmap, train))
    cfg = DLRMConfig(n_dense=2, slot_fields=fmap.schema.slot_fields(), dim=8, bottom_mlp=[8, 8],
                     top_mlp=[8])
    model = build_dlrm(cfg, emb, fmap).eval()
    if dtype == "float16":
        model.embedding.memory.data = model.embedding.memory.data.half()
    model.embedding.to_serving("hot")
    model.signed = np.concatenate(toks)  # tokens to query: signed (hot) ones among them
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exported_hot_form_dlrm(tmp_path: Path, dtype: str) -> None:
    """A DLRM whose LMA embedding is in the hot serving form: one HotGather node, a KeyLookup for
    token -> hot row, every node with a CUDA kernel, logits equal to torch eager."""
    model = _hot_dlrm(dtype)
    assert model.embedding.hot.shape[0] > 0 and model.embedding.hot.dtype == getattr(torch, dtype)
    rng = np.random.default_rng(5)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dense = torch.randn(4, 2)
    tokens = torch.from_numpy(rng.choice(model.signed, (4, 3)))
    with torch.no_grad():
        program = torch.export.export(model, (dense, tokens),
                                      dynamic_shapes=({0: batch}, {0: batch}))
    path = tmp_path / "m.onnx"
    onnx_op.export_onnx(program, (dense, tokens), path, ["dense", "tokens"], ["logits"])
    proto = onnx.load(str(path))
    types = sorted(n.op_type for n in proto.graph.node if n.domain == onnx_op.DOMAIN)
    assert types == [onnx_op.HOT_OP_TYPE, onnx_op.KEY_LOOKUP_OP_TYPE]
    assert cuda_kernels.cuda_problems(proto) == []
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 7, 500):
        tok = rng.choice(model.signed, (rows, 3))
        cold = rng.random((rows, 3)) < 0.3
        tok[cold] = rng.integers(I64_MIN, I64_MAX, int(cold.sum()), dtype=np.int64)
        d = rng.standard_normal((rows, 2)).astype(np.float32)
        (y,) = sess.run(None, {"dense": d, "tokens": tok})
        with torch.no_grad():
            want = model(torch.from_numpy(d), torch.from_numpy(tok)).numpy()
        np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


def test_external_data_export_attaches_both_functions(tmp_path: Path) -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=True, m=5003, seed=4)
    module = _hot_module(cfg, 20, torch.float32).eval()
    rng = np.random.default_rng(3)
    index, keys = _case(rng, 4, 20, 0.5)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    path = tmp_path / "big.onnx"
    proto = onnx_op.export_onnx(module, (torch.from_numpy(index), torch.from_numpy(keys)), path,
                                ["index", "keys"], ["rows"],
                                dynamic_shapes=({0: batch}, {0: batch}), external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()
    assert sorted(f.name for f in proto.functions) == [onnx_op.OP_TYPE, onnx_op.HOT_OP_TYPE]
    (node,) = [n for n in proto.graph.node if n.domain == onnx_op.DOMAIN]
    assert {a.name: a.i for a in node.attribute if a.name in ("t", "aligned")} == {"t": 8, "aligned": 1}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    index, keys = _case(rng, 300, 20, 0.4)
    (y,) = sess.run(None, {"index": index, "keys": keys})
    with torch.no_grad():
        want = module(torch.from_numpy(index), torch.from_numpy(keys)).numpy()
    assert np.array_equal(_bits(y), _bits(want))


def test_standalone_hashed_gather_keeps_a_float16_memory() -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=4099, seed=1)
    memory = np.random.default_rng(0).standard_normal(cfg.m).astype(np.float16)
    index, keys = _case(np.random.default_rng(1), 5, 0, 1.0)
    (y,) = _session(onnx_op.standalone_model(cfg, memory=memory)).run(None, {"keys": keys})
    assert y.dtype == np.float16
    assert np.array_equal(_bits(y), _bits(_reference(cfg, memory, memory[:0].reshape(0, 16),
                                                     index, keys)))
