"""Key tables (constant-time token -> value): every implementation equals the binary search."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lma import hashspec as hs
from lma.ops import _native, key_lookup, key_lookup_reference
from lma.ops.key_lookup import KeyLookup, bucket_pair_torch
from model_export import cuda_kernels, onnx_op
from tests.triton_interpreter import run_interpreted

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME = np.array([I64_MIN, I64_MAX, 0, 1, -1, I64_MIN + 1, I64_MAX - 1, 2, 3], dtype=np.int64)


def _search(keys: np.ndarray, values: np.ndarray, q: np.ndarray, default: np.ndarray) -> np.ndarray:
    """What the replaced code did: left binary search in the sorted keys, hit test, select."""
    order = np.argsort(keys, kind="stable")
    sk, sv = keys[order], values[order]
    if len(sk) == 0:
        return np.broadcast_to(default, q.shape).copy()
    pos = np.minimum(np.searchsorted(sk, q), len(sk) - 1)
    return np.where(sk[pos] == q, sv[pos], np.broadcast_to(default, q.shape))


def _case(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    big = rng.integers(I64_MIN, I64_MAX, 3000, dtype=np.int64, endpoint=True)
    if name == "empty":
        keys = np.zeros(0, np.int64)
    elif name == "one":
        keys = np.array([0], np.int64)
    elif name == "extreme":
        keys = np.concatenate([EXTREME[:5], big[:100]])
    elif name == "duplicates":
        keys = np.concatenate([big[:200], big[:50], [I64_MAX, I64_MAX, 0, 0]]).astype(np.int64)
    else:
        keys = big
    values = rng.integers(I64_MIN, I64_MAX, len(keys), dtype=np.int64, endpoint=True)
    absent = rng.integers(I64_MIN, I64_MAX, 500, dtype=np.int64, endpoint=True)
    q = np.concatenate([keys, absent, EXTREME, keys[::-1]]).astype(np.int64)
    q = q[: len(q) - len(q) % 4].reshape(-1, 4)
    return keys, values, q


CASES = ["empty", "one", "extreme", "duplicates", "random"]


@pytest.mark.parametrize("name", CASES)
def test_numpy_table_equals_binary_search(name: str) -> None:
    keys, values, q = _case(name)
    table = hs.build_key_table(keys, values)
    default = np.arange(q.shape[1], dtype=np.int64) - 7
    assert np.array_equal(hs.key_table_lookup(table, q, default), _search(keys, values, q, default))
    assert table.n_buckets >= hs.MIN_BUCKETS and table.buckets.shape == (table.n_buckets, hs.ROW)
    b = hs.bucket_pair(q.reshape(-1), table.n_buckets)
    assert (b[:, 0] != b[:, 1]).all() and b.min() >= 0 and b.max() < table.n_buckets


def test_table_is_compact_and_interleaved() -> None:
    keys, values, _ = _case("random")
    table = hs.build_key_table(keys, values, seed=5)
    assert table.n_keys == len(np.unique(keys))
    assert table.n_keys / table.keys.size >= 0.6  # load factor
    assert table.nbytes == table.n_buckets * 64  # one cache line per bucket, keys and values
    # every key sits in one of its two buckets, its value in the lane beside it
    b = hs.bucket_pair(keys, table.n_buckets)
    for k, v, (b0, b1) in zip(keys.tolist(), values.tolist(), b.tolist(), strict=True):
        for bb in (b0, b1):
            lanes = np.flatnonzero(table.keys[bb] == k)
            if len(lanes):
                assert table.values[bb, lanes[0]] == v
                break
        else:
            raise AssertionError(f"key {k} in neither bucket")


def test_bucket_pair_of_extreme_keys() -> None:
    # low / high 32 bits of the two's-complement bits, unsigned
    for nb in (4, 5, 1 << 20, (1 << 31) + 11):
        b = hs.bucket_pair(EXTREME, nb)
        lo = EXTREME.view(np.uint64) & np.uint64(0xFFFFFFFF)
        hi = EXTREME.view(np.uint64) >> np.uint64(32)
        want0 = [int(x) % nb for x in lo]
        want1 = [(w + 1 + int(h) % (nb - 1)) % nb for w, h in zip(want0, hi, strict=True)]
        assert b[:, 0].tolist() == want0 and b[:, 1].tolist() == want1
        tb = bucket_pair_torch(torch.from_numpy(EXTREME), nb)
        assert np.array_equal(tb.numpy(), b)


def test_build_grows_the_table_when_placement_fails() -> None:
    # 13 keys get 5 buckets; multiples of 5 below 2^32 all map to the pair (0, 1), which holds 8
    keys = 5 * np.arange(13, dtype=np.int64)
    assert (hs.bucket_pair(keys, 5) == [0, 1]).all()
    table = hs.build_key_table(keys, np.arange(13) + 100)
    assert table.n_buckets > 5
    q = np.concatenate([keys, keys + 1])
    assert np.array_equal(hs.key_table_lookup(table, q, -1), np.r_[np.arange(13) + 100, [-1] * 13])


@pytest.mark.parametrize("name", CASES)
def test_torch_reference_and_cpp_equal_numpy(name: str) -> None:
    keys, values, q = _case(name, seed=1)
    table = hs.build_key_table(keys, values)
    mod = KeyLookup(table)
    default = torch.arange(q.shape[1]) - 3
    want = hs.key_table_lookup(table, q, default.numpy())
    assert np.array_equal(want, _search(keys, values, q, default.numpy()))
    tq = torch.from_numpy(q)
    b = bucket_pair_torch(tq.reshape(-1), table.n_buckets)
    assert np.array_equal(b.numpy(), hs.bucket_pair(q.reshape(-1), table.n_buckets))
    ref = key_lookup_reference(tq, default, mod.table)
    assert np.array_equal(ref.numpy(), want)
    if _native.native_module() is not None:
        ext = _native.native_module()
        assert ext.KEY_TABLE_VERSION == hs.KEY_TABLE_VERSION
        got = ext.key_lookup(tq, default, mod.table)
        assert np.array_equal(got.numpy(), want)
        assert np.array_equal(mod(tq, default).numpy(), want)  # the op, dispatched to C++
    big = torch.from_numpy(np.tile(q, (300, 1)))  # several parallel chunks in C++
    assert np.array_equal(key_lookup(big, default, mod.table).numpy(), np.tile(want, (300, 1)))


@pytest.mark.parametrize("name", CASES)
def test_onnx_function_equals_numpy_and_runs_on_cuda_kernels(name: str) -> None:
    keys, values, q = _case(name, seed=2)
    table = hs.build_key_table(keys, values)
    model = onnx_op.key_lookup_model(table)
    assert cuda_kernels.cuda_problems(model) == []
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    default = np.broadcast_to(np.arange(q.shape[1], dtype=np.int64), q.shape).copy()
    (got,) = sess.run(None, {"keys": q, "default": default})
    assert np.array_equal(got, hs.key_table_lookup(table, q, default))


def test_torch_export_and_onnx_export_of_the_op(tmp_path: Path) -> None:
    keys, values, q = _case("extreme", seed=3)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kt = KeyLookup(hs.build_key_table(keys, values))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.kt(t, t)

    m = M().eval()
    tq = torch.from_numpy(q)
    want = hs.key_table_lookup(hs.build_key_table(keys, values), q, q)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(m, (tq[:2],), dynamic_shapes=({0: batch},))
    assert "lma.key_lookup.default" in {str(n.target) for n in ep.graph.nodes}
    assert np.array_equal(ep.module()(tq).numpy(), want)
    path = tmp_path / "kl.onnx"
    proto = onnx_op.export_onnx(ep, (tq[:2],), path, ["tokens"], ["keys"])
    assert [n.op_type for n in proto.graph.node if n.domain == onnx_op.DOMAIN] == ["KeyLookup"]
    assert cuda_kernels.cuda_problems(proto) == []
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"tokens": q})
    assert np.array_equal(got, want)


def test_triton_kernel_in_interpreter() -> None:
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from lma import hashspec as hs
        from lma.ops import triton_kernels as tk
        from lma.ops.key_lookup import KeyLookup
        rng = np.random.default_rng(0)
        for n in (0, 1, 1000):
            keys = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
            keys[: min(n, 2)] = [-(1 << 63), (1 << 63) - 1][: min(n, 2)]
            t = hs.build_key_table(keys, np.arange(n))
            m = KeyLookup(t)
            q = np.concatenate([keys, [0, 1, -1, -(1 << 63), (1 << 63) - 1, 5]]).astype(np.int64)
            d = torch.full((len(q),), -9)
            got = tk.key_lookup(torch.from_numpy(q), d, m.table)
            assert np.array_equal(got.numpy(), hs.key_table_lookup(t, q, -9)), n
        print("ok")
        """
    )
    run_interpreted(code)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CASES)
def test_cuda_equals_numpy(name: str) -> None:
    keys, values, q = _case(name, seed=4)
    table = hs.build_key_table(keys, values)
    mod = KeyLookup(table).cuda()
    default = torch.arange(q.shape[1]) - 3
    got = mod(torch.from_numpy(q).cuda(), default.cuda())
    assert np.array_equal(got.cpu().numpy(), hs.key_table_lookup(table, q, default.numpy()))


def test_onnx_function_batches_by_bucket_and_default_shapes() -> None:
    """Batches whose keys all live in their first bucket, all in their second, are all absent,
    mixed, extreme or a single key, small and large, with defaults of every broadcastable shape:
    the ONNX function equals the numpy lookup."""
    keys, values, _ = _case("random", seed=4)
    table = hs.build_key_table(keys, values)
    b = hs.bucket_pair(keys, table.n_buckets)
    in_b0 = (table.keys[b[:, 0]] == keys[:, None]).any(axis=1)
    assert 0 < in_b0.mean() < 1
    absent = np.random.default_rng(5).integers(I64_MIN, I64_MAX, 64, dtype=np.int64, endpoint=True)
    batches = {
        "all in b0": keys[in_b0][:64], "all in b1": keys[~in_b0][:64], "all absent": absent,
        "b1 and absent": np.concatenate([keys[~in_b0][:32], absent[:32]]),
        "extreme": np.resize(EXTREME, 64), "one": keys[~in_b0][:1],
    }
    model = onnx_op.key_lookup_model(table, default_shape=["d0", "d1"])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for what, small in batches.items():
        for flat in (small, np.resize(small, 4096)):
            q = flat.reshape(-1, 4) if flat.size % 4 == 0 else flat.reshape(1, -1)
            for default in (np.full((1, 1), -7, np.int64),
                            np.arange(q.shape[1], dtype=np.int64)[None],
                            np.arange(q.size, dtype=np.int64).reshape(q.shape)):
                (got,) = sess.run(None, {"keys": q, "default": default})
                want = hs.key_table_lookup(table, q, default)
                assert np.array_equal(got, want), (what, q.size)
