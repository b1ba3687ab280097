"""The onnxruntime custom-op library (``lma/ort_ops.py``): registered on a CPU session it runs the
``ai.lma`` nodes with the C++ kernels, bit for bit what the model-local functions compute (and
the numpy reference), and it refuses bad inputs with a clear error instead of crashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lma import hashspec, ort_ops
from lma.ops import HashedGatherConfig
from model_export import onnx_op

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME = [0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, 0xFFFF, (1 << 32) - 1, 1 << 32, -(1 << 32)]

pytestmark = pytest.mark.skipif(ort_ops.library() is None,
                                reason=f"the library cannot be built here: {ort_ops.unavailable_reason()}")


def _session(model: onnx.ModelProto, native: bool, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if native:
        so.register_custom_ops_library(str(ort_ops.library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _both(model: onnx.ModelProto) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return _session(model, False), _session(model, True)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _profiled_ops(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> set[str]:
    """The op types onnxruntime ran for one call with the library registered."""
    import json
    import os
    import tempfile

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "p")
    so.register_custom_ops_library(str(ort_ops.library()))
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, feeds)
    path = s.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def _table(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, hashspec.KeyTable]:
    keys = np.unique(np.concatenate([rng.integers(I64_MIN, I64_MAX, n, dtype=np.int64, endpoint=True),
                                     np.array(EXTREME[:6], np.int64)]))
    values = rng.integers(0, 1 << 40, len(keys))
    return keys, values, hashspec.build_key_table(keys, values)


@pytest.mark.parametrize("default_shape", [[], [1, 26], [26], [500, 26], [500, 1]])
def test_key_lookup_equals_the_function(default_shape: list[int]) -> None:
    rng = np.random.default_rng(len(default_shape))
    keys, values, table = _table(rng, 20_000)
    model = onnx_op.key_lookup_model(table, default_shape=default_shape)
    q = np.concatenate([rng.choice(keys, 500 * 20), np.array(EXTREME, np.int64),
                        rng.integers(I64_MIN, I64_MAX, 500 * 6 - len(EXTREME), dtype=np.int64)])
    q = rng.permutation(q).reshape(500, 26)
    default = (-1 - rng.integers(0, 1000, default_shape or [1])).astype(np.int64)
    if not default_shape:
        default = default.reshape(())
    func, native = _both(model)
    feeds = {"keys": q, "default": default}
    got = native.run(None, feeds)[0]
    assert np.array_equal(got, func.run(None, feeds)[0])
    want = hashspec.key_table_lookup(table, q, np.broadcast_to(default, q.shape))
    assert np.array_equal(got, want)
    assert (got < 0).any() and (got >= 0).any()  # absent and present keys both ran
    ops = _profiled_ops(model, feeds)
    assert onnx_op.KEY_LOOKUP_OP_TYPE in ops and "GatherElements" not in ops  # the native kernel


def test_key_lookup_of_an_empty_batch() -> None:
    _, _, table = _table(np.random.default_rng(3), 100)
    model = onnx_op.key_lookup_model(table, default_shape=[1, 26])
    got = _session(model, True).run(None, {"keys": np.zeros((0, 26), np.int64),
                                           "default": np.zeros((1, 26), np.int64)})[0]
    assert got.shape == (0, 26)


def test_bad_default_and_table_are_errors_not_crashes() -> None:
    _, _, table = _table(np.random.default_rng(4), 1000)
    model = onnx_op.key_lookup_model(table, default_shape=["d0", "d1"])
    sess = _session(model, True)
    q = np.zeros((4, 26), np.int64)
    with pytest.raises(Exception, match="does not broadcast"):
        sess.run(None, {"keys": q, "default": np.zeros((4, 3), np.int64)})
    broken = hashspec.KeyTable(rows=table.rows[:-1].copy(), n_keys=table.n_keys)
    sess = _session(onnx_op.key_lookup_model(broken, default_shape=[1, 26]), True)
    with pytest.raises(Exception, match="does not fit its own header"):
        sess.run(None, {"keys": q, "default": np.zeros((1, 26), np.int64)})


def test_unknown_table_version_is_refused_at_session_start() -> None:
    _, _, table = _table(np.random.default_rng(5), 100)
    model = onnx_op.key_lookup_model(table, default_shape=[1, 26])
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "table_version":
                a.i = 4
    with pytest.raises(Exception, match="key table version 4"):
        _session(model, True).run(None, {"keys": np.zeros((1, 26), np.int64),
                                         "default": np.zeros((1, 26), np.int64)})


CONFIGS = [(mode, z, aligned) for mode in ("lma", "robez")
           for z, aligned in ((1, False), (4, False), (4, True), (16, False), (16, True))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode,z,aligned", CONFIGS)
def test_hashed_gather_equals_the_function(dtype: type, mode: str, z: int, aligned: bool) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=10007, seed=z + 1)
    rng = np.random.default_rng(z)
    memory = rng.standard_normal(cfg.m).astype(dtype)
    model = onnx_op.standalone_model(cfg, memory)
    func, native = _both(model)
    for rows in (1, 333):
        keys = rng.integers(I64_MIN, I64_MAX, (rows, 26), dtype=np.int64, endpoint=True)
        keys.reshape(-1)[: min(len(EXTREME), keys.size)] = EXTREME[: keys.size]
        got = native.run(None, {"keys": keys})[0]
        assert got.dtype == dtype and got.shape == (rows, 26, 16)
        assert np.array_equal(_bits(got), _bits(func.run(None, {"keys": keys})[0]))
        slots = hashspec.slot_indices(keys.reshape(-1), cfg.params(), cfg.m, cfg.z, cfg.mode,
                                      cfg.aligned)
        assert np.array_equal(_bits(got), _bits(memory[slots].reshape(rows, 26, 16)))
    assert _profiled_ops(model, {"keys": keys}) == {onnx_op.OP_TYPE}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode,z,aligned", [("lma", 1, False), ("lma", 4, True), ("robez", 16, False)])
def test_hot_gather_equals_the_function(dtype: type, mode: str, z: int, aligned: bool) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=4099, seed=2)
    rng = np.random.default_rng(7)
    memory = rng.standard_normal(cfg.m).astype(dtype)
    for h in (0, 1, 300):
        hot = rng.standard_normal((h, 16)).astype(dtype)
        func, native = _both(onnx_op.hot_standalone_model(cfg, memory, hot))
        for cold in (0.0, 0.3, 1.0):
            keys = rng.integers(I64_MIN, I64_MAX, (200, 26), dtype=np.int64, endpoint=True)
            index = rng.integers(0, max(h, 1), (200, 26)).astype(np.int64)
            index[(rng.random((200, 26)) < cold) | (h == 0)] = -1
            feeds = {"index": index, "keys": keys}
            got = native.run(None, feeds)[0]
            assert np.array_equal(_bits(got), _bits(func.run(None, feeds)[0])), (h, cold)


def test_several_threads_give_the_same_answers() -> None:
    """Batches of many tasks, split over the session's intra-op threads (KernelContext_ParallelFor)."""
    rng = np.random.default_rng(11)
    keys, _, table = _table(rng, 50_000)
    q = rng.permutation(np.concatenate([rng.choice(keys, 60_000),
                                        rng.integers(I64_MIN, I64_MAX, 18_000, dtype=np.int64)]))
    q = q.reshape(3000, 26)
    model = onnx_op.key_lookup_model(table, default_shape=[26])
    feeds = {"keys": q, "default": -1 - np.arange(26, dtype=np.int64)}
    want = _session(model, False).run(None, feeds)[0]
    assert np.array_equal(_session(model, True, threads=3).run(None, feeds)[0], want)
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=10007, seed=3)
    memory = rng.standard_normal(cfg.m).astype(np.float32)
    hot = rng.standard_normal((500, 16)).astype(np.float32)
    index = rng.integers(-1, 500, (3000, 26)).astype(np.int64)
    for model, feeds in ((onnx_op.standalone_model(cfg, memory), {"keys": q}),
                         (onnx_op.hot_standalone_model(cfg, memory, hot), {"index": index, "keys": q})):
        want = _session(model, False).run(None, feeds)[0]
        got = _session(model, True, threads=3).run(None, feeds)[0]
        assert np.array_equal(_bits(got), _bits(want))


def test_hot_index_out_of_range_is_an_error() -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=999, seed=1)
    model = onnx_op.hot_standalone_model(cfg, np.zeros(999, np.float32), np.zeros((3, 16), np.float32))
    index = np.full((2, 26), -1, np.int64)
    index[1, 5] = 3
    with pytest.raises(Exception, match="hot index 3 at position 31 is out of range for 3 hot rows"):
        _session(model, True).run(None, {"index": index, "keys": np.zeros((2, 26), np.int64)})


def test_modes_and_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, want in (("", "auto"), ("auto", "auto"), ("1", "1"), ("off", "0"), ("0", "0")):
        monkeypatch.setenv(ort_ops.MODE_ENV, value)
        assert ort_ops.mode() == want
    monkeypatch.setenv(ort_ops.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="expected auto, 1 or 0"):
        ort_ops.mode()
    monkeypatch.setenv(ort_ops.MODE_ENV, "auto")
    monkeypatch.setenv(ort_ops.DISABLE_ENV, "1")
    assert ort_ops.mode() == "0"
    monkeypatch.delenv(ort_ops.DISABLE_ENV)
    so = ort.SessionOptions()
    assert ort_ops.register(so, ["CPUExecutionProvider"])
    assert not ort_ops.register(ort.SessionOptions(), [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    monkeypatch.setenv(ort_ops.MODE_ENV, "1")
    with pytest.raises(RuntimeError, match="CPU provider only"):
        ort_ops.register(ort.SessionOptions(), ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_registering_twice_on_one_options_object_is_harmless() -> None:
    _, _, table = _table(np.random.default_rng(9), 100)
    model = onnx_op.key_lookup_model(table, default_shape=[])
    so = ort.SessionOptions()
    for _ in range(2):
        assert ort_ops.register(so, ["CPUExecutionProvider"])
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        assert sess.run(None, {"keys": np.zeros((1, 26), np.int64), "default": np.array(-1)})[0].shape == (1, 26)


def test_a_build_failure_falls_back_in_auto_and_raises_when_required(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv(ort_ops.DIR_ENV, str(tmp_path / "ops"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(ort_ops, "_tried", False)
    monkeypatch.setattr(ort_ops, "_path", None)
    monkeypatch.setenv(ort_ops.MODE_ENV, "auto")
    assert not ort_ops.register(ort.SessionOptions(), ["CPUExecutionProvider"])
    assert "no-such-compiler" in (ort_ops.unavailable_reason() or "")
    monkeypatch.setenv(ort_ops.MODE_ENV, "1")
    with pytest.raises(RuntimeError, match="unavailable"):
        ort_ops.register(ort.SessionOptions(), ["CPUExecutionProvider"])


def test_prebuilt_library_loads_from_a_read_only_folder_without_a_compiler(tmp_path) -> None:  # noqa: ANN001
    """As in the serving image: built ahead of time (python -m lma.ort_ops), then used from a
    read-only folder with no compiler on PATH; nothing is written there."""
    import os
    import shutil
    import stat
    import subprocess
    import sys

    built = ort_ops.library()
    lib_dir = tmp_path / "ort_ops"
    lib_dir.mkdir()
    shutil.copy2(built, lib_dir / built.name)
    lib_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    script = (
        "import onnxruntime as ort\n"
        "from lma import ort_ops\n"
        "so = ort.SessionOptions()\n"
        "assert ort_ops.register(so, ['CPUExecutionProvider']), ort_ops.unavailable_reason()\n"
        "print(ort_ops.library())\n"
    )
    env = dict(os.environ, LMA_ORT_OPS_DIR=str(lib_dir), LMA_ORT_NATIVE_OPS="1",
               CXX="/nonexistent/c++", PATH="/nonexistent",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("LMA_DISABLE_NATIVE_OPS", None)
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    finally:
        lib_dir.chmod(0o755)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(lib_dir / built.name)
    assert sorted(p.name for p in lib_dir.iterdir()) == [built.name], "nothing written"


def test_version_marker_mismatch_and_compiler_failure_are_reported(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setattr(hashspec, "KEY_TABLE_VERSION", hashspec.KEY_TABLE_VERSION + 1)
    with pytest.raises(RuntimeError, match="computes key table v3"):
        ort_ops._check_library(ort_ops.library())
    monkeypatch.undo()
    monkeypatch.setenv(ort_ops.DIR_ENV, str(tmp_path / "ops"))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(RuntimeError, match="failed .*exited 1"):
        ort_ops.build()
    assert not any((tmp_path / "ops").glob("*.so*")), "no partial library left behind"
