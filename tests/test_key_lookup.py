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
from lma.ops.key_lookup import KeyLookup, slot_hashes_torch
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


def _fillers(table: hs.KeyTable, keys: np.ndarray) -> np.ndarray:
    """The filler keys of a table's empty slots (keys stored that were not given)."""
    return np.setdiff1d(np.unique(table.keys), keys)


@pytest.mark.parametrize("name", CASES)
def test_numpy_table_equals_binary_search(name: str) -> None:
    keys, values, q = _case(name)
    table = hs.build_key_table(keys, values)
    default = np.arange(q.shape[1], dtype=np.int64) - 7
    assert np.array_equal(hs.key_table_lookup(table, q, default), _search(keys, values, q, default))
    m, g = table.n_slots, table.n_groups
    assert m >= hs.MIN_SLOTS and hs._is_prime(m) and hs._is_prime(g)
    assert table.rows.shape == (hs.table_rows(m, g), hs.ROW)
    assert table.rows[1, 1] == table.n_keys == len(np.unique(keys))
    slots = hs.key_slots(table, q.reshape(-1))
    assert slots.min() >= 0 and slots.max() < m
    # a query equal to a filler key (what empty slots hold) is absent too
    fill = _fillers(table, keys)
    assert 1 <= len(fill) <= 2
    assert (hs.key_table_lookup(table, fill, -3) == -3).all()


def test_table_is_compact_and_each_key_in_its_slot() -> None:
    keys, values, _ = _case("random")
    table = hs.build_key_table(keys, values, seed=5)
    assert table.n_keys == len(np.unique(keys))
    assert table.n_keys / table.n_slots >= 0.8  # load factor
    assert table.nbytes == 16 * table.rows.shape[0]  # a slot row: key and value side by side
    assert table.nbytes <= 22 * table.n_keys  # slots and displacements, ~21 bytes per key
    d = table.displacements
    assert d.min() >= 0 and d.max() < hs.MAX_DISPLACEMENT
    slot = hs.key_slots(table, keys)
    assert len(np.unique(slot)) == len(keys)  # one slot per key, no two keys share one
    assert np.array_equal(table.keys[slot], keys) and np.array_equal(table.values[slot], values)
    # every other slot holds a filler key whose own slot is elsewhere
    empty = np.setdiff1d(np.arange(table.n_slots), slot)
    for f in np.unique(table.keys[empty]).tolist():
        assert f not in set(keys.tolist())
        own = int(hs.key_slots(table, np.array([f]))[0])
        assert table.keys[own] != f


def _slot_hashes_by_hand(k: int, m: int, g: int, a: int) -> tuple[int, int, int]:
    y = ((k & ((1 << 64) - 1)) * a) % (1 << 64)
    return (y >> 32) % g, (y & 0xFFFFFFFF) % m, 1 + (y >> 32) % (m - 1)


def test_slot_hashes_of_extreme_keys() -> None:
    """numpy and torch against Python integers: the wrapping product, both halves unsigned."""
    for m, g, a in ((5, 1, 1), (13, 3, hs._multiplier(0)), ((1 << 32) - 5, (1 << 31) + 11,
                                                            hs._multiplier(7)), (7, 2, (1 << 64) - 1)):
        want = [_slot_hashes_by_hand(int(k), m, g, a) for k in EXTREME]
        got = hs.slot_hashes(EXTREME, m, g, a)
        assert [tuple(int(x[i]) for x in got) for i in range(len(EXTREME))] == want
        a64 = a - (1 << 64) if a >= 1 << 63 else a  # A in its int64 form
        tg = slot_hashes_torch(torch.from_numpy(EXTREME), m, g, a64)
        assert all(np.array_equal(t.numpy(), x) for t, x in zip(tg, got, strict=True))
    with pytest.raises(ValueError, match="slots"):
        hs.slot_hashes(EXTREME, 1 << 32, 1, 1)


def test_build_grows_the_table_when_placement_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed placement grows the table to the next prime past 2% more slots and takes the
    next multiplier; the lookups stay exact."""
    keys, values, q = _case("random", seed=6)
    plain = hs.build_key_table(keys, values)
    place, calls = hs._place, []

    def failing_once(*args: object) -> np.ndarray | None:
        calls.append(args[3])
        return None if len(calls) == 1 else place(*args)

    monkeypatch.setattr(hs, "_place", failing_once)
    table = hs.build_key_table(keys, values)
    assert calls[0] == plain.n_slots and table.n_slots == calls[1] > plain.n_slots * 1.02
    assert hs._is_prime(table.n_slots) and table.multiplier == hs._multiplier(1) != plain.multiplier
    want = _search(keys, values, q, np.int64(-1))
    assert np.array_equal(hs.key_table_lookup(table, q, -1), want)


def test_displacement_limit_fails_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, values, _ = _case("random", seed=7)
    g, s0, s1 = hs.slot_hashes(keys, 3539, 750, hs._multiplier(0))
    assert hs._place(g, s0, s1, 3539, 750) is not None
    monkeypatch.setattr(hs, "MAX_DISPLACEMENT", 1)  # every group must take its first slots
    assert hs._place(g, s0, s1, 3539, 750) is None


@pytest.mark.parametrize("name", CASES)
def test_torch_reference_and_cpp_equal_numpy(name: str) -> None:
    keys, values, q = _case(name, seed=1)
    table = hs.build_key_table(keys, values)
    mod = KeyLookup(table)
    default = torch.arange(q.shape[1]) - 3
    want = hs.key_table_lookup(table, q, default.numpy())
    assert np.array_equal(want, _search(keys, values, q, default.numpy()))
    tq = torch.from_numpy(q)
    a64 = int(table.rows[1, 0])
    th = slot_hashes_torch(tq.reshape(-1), table.n_slots, table.n_groups, a64)
    nh = hs.slot_hashes(q.reshape(-1), table.n_slots, table.n_groups, table.multiplier)
    assert all(np.array_equal(t.numpy(), x) for t, x in zip(th, nh, strict=True))
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


def test_onnx_function_batches_by_kind_and_default_shapes() -> None:
    """Batches whose keys all took their group's first slots, all were displaced, are all absent
    (landing on empty slots or on other keys' slots), are the filler keys, mixed, extreme or a
    single key, small and large, with defaults of every broadcastable shape: the ONNX function
    equals the numpy lookup."""
    keys, values, _ = _case("random", seed=4)
    table = hs.build_key_table(keys, values)
    g, _, _ = hs.slot_hashes(keys, table.n_slots, table.n_groups, table.multiplier)
    first = table.displacements[g] == 0
    assert 0 < first.mean() < 1
    absent = np.random.default_rng(5).integers(I64_MIN, I64_MAX, 4096, dtype=np.int64, endpoint=True)
    absent = np.setdiff1d(absent, keys)
    filled = np.isin(table.keys[hs.key_slots(table, absent)], keys)
    assert 0 < filled.mean() < 1
    batches = {
        "first slots": keys[first][:64], "displaced": keys[~first][:64],
        "absent, on empty slots": absent[~filled][:64], "absent, on keys": absent[filled][:64],
        "fillers": _fillers(table, keys), "displaced and absent":
            np.concatenate([keys[~first][:32], absent[:32]]),
        "extreme": np.resize(EXTREME, 64), "one": keys[~first][:1],
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


def test_cpp_refuses_a_table_that_does_not_fit_its_header() -> None:
    """The C++ lookup reads M and G from the table itself, so a table whose row count disagrees
    with them (truncated, or a v2 (n_buckets, 8) table) is refused before any slot is read."""
    ext = _native.native_module()
    if ext is None:
        pytest.skip(f"no C++ extension here: {_native.native_error()}")
    keys, values, q = _case("random", seed=8)
    t = torch.from_numpy(hs.build_key_table(keys, values).rows)
    tq, d = torch.from_numpy(q), torch.tensor(-1)
    for bad, match in ((t[:-1], "does not fit its own header"), (t[:48].reshape(-1, 8), "v3"),
                       (t.clone().index_fill_(0, torch.tensor([0]), 1), "does not fit")):
        with pytest.raises(RuntimeError, match=match):
            ext.key_lookup(tq, d, bad.contiguous())


@pytest.mark.parametrize("kind", ["small integers", "multiples of 2^32", "high bits only"])
def test_structured_keys_build_quickly_and_exactly(kind: str) -> None:
    """Keys whose own halves carry little entropy (what v3's multiplier is for): a table of them
    builds in one attempt or a few and answers exactly."""
    n = 20_000
    i = np.arange(n, dtype=np.int64)
    keys = {"small integers": i - n // 2, "multiples of 2^32": i << np.int64(32),
            "high bits only": (i << np.int64(44)) | np.int64(12345)}[kind]
    values = i * 3 + 1
    table = hs.build_key_table(keys, values)
    assert table.n_slots < 1.2 * n / hs.DEFAULT_LOAD  # at most a few 2% growths
    q = np.concatenate([keys, keys + 1, keys - (1 << 32), EXTREME])
    assert np.array_equal(hs.key_table_lookup(table, q, -1), _search(keys, values, q, np.int64(-1)))


def test_inseparable_keys_fail_placement_at_once() -> None:
    """Two keys of one group with the same base and step collide at every displacement: the
    placement says so before trying any."""
    g = np.array([0, 0, 1], np.int64)
    s0 = np.array([3, 3, 4], np.int64)
    s1 = np.array([2, 2, 5], np.int64)
    assert hs._place(g, s0, s1, 7, 2) is None
    assert hs._place(g, s0, np.array([2, 3, 5], np.int64), 7, 2) is not None


def test_inseparable_keys_found_among_keys_sharing_a_base() -> None:
    """Keys sharing a group and a base are checked exactly, whatever their order: a third key
    of the same base between two with the same step does not hide the pair (steps 5, 7, 5)."""
    g = np.array([1, 0, 1, 1, 0], np.int64)
    s0 = np.array([2, 6, 2, 2, 1], np.int64)
    for s1 in ([5, 3, 7, 5, 4], [7, 3, 5, 5, 4], [5, 3, 5, 7, 4]):
        assert hs._place(g, s0, np.array(s1, np.int64), 11, 2) is None
    disp = hs._place(g, s0, np.array([5, 3, 7, 6, 4], np.int64), 11, 2)
    assert disp is not None
    slots = (s0 + disp[g] * np.array([5, 3, 7, 6, 4])) % 11
    assert len(set(slots.tolist())) == 5
