"""``lma::hot_embed``: the hot serving form's key table lookup (token -> hot row) and
``lma::hot_gather`` in one op. The fused C++ kernel, the composed backends (lookup, then hot
gather) and the ONNX translation must all give ``hot_gather(key_lookup(tokens, -1), tokens)``
bit for bit: hot tokens their row, every other token (absent, extreme) its hashed gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lma.ops import (
    HashedGatherConfig,
    KeyLookup,
    _native,
    hot_embed,
    hot_gather_reference,
    implementation,
    key_lookup_reference,
)
from tests.test_ops import CASES, EXTREME, I64_MAX, I64_MIN


@pytest.fixture
def native() -> None:
    if _native.native_module() is None:
        pytest.skip(f"native kernels unavailable: {_native.native_error()}")


def _case(n_hot: int, shape: tuple[int, ...], dtype: torch.dtype, m: int, seed: int,
          hot_share: float = 0.7) -> tuple[torch.Tensor, ...]:
    """memory, hot rows, key table (hot token -> row), tokens: about ``hot_share`` hot tokens,
    the rest absent from the table (random, and the int64 extremes first)."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(m, generator=g).to(dtype)
    hot = torch.randn(n_hot, 16, generator=g).to(dtype)
    hot_tokens = np.unique(torch.randint(I64_MIN, I64_MAX, (n_hot,), dtype=torch.int64,
                                         generator=g).numpy())
    hot = hot[: len(hot_tokens)]
    table = KeyLookup.build(hot_tokens, np.arange(len(hot_tokens), dtype=np.int64)).table
    tokens = torch.randint(I64_MIN, I64_MAX, shape, dtype=torch.int64, generator=g)
    flat = tokens.view(-1)
    pick = torch.rand(flat.shape, generator=g) < hot_share
    if len(hot_tokens):
        flat[pick] = torch.from_numpy(hot_tokens)[torch.randint(0, len(hot_tokens),
                                                                (int(pick.sum()),), generator=g)]
    k = min(len(EXTREME), flat.numel())
    flat[:k] = torch.tensor(EXTREME[:k], dtype=torch.int64)
    return memory, hot, table, tokens


def _want(memory: torch.Tensor, hot: torch.Tensor, table: torch.Tensor, tokens: torch.Tensor,
          cfg: HashedGatherConfig) -> torch.Tensor:
    index = key_lookup_reference(tokens, torch.tensor(-1), table)
    return hot_gather_reference(memory, hot, index, tokens, cfg.param_tensors(),
                                cfg.with_m(memory.shape[0]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_fused_composed_and_op_agree(native: None, mode: str, z: int, aligned: bool,
                                     dtype: torch.dtype) -> None:
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=2053, seed=5)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(300, (67, 26), dtype, cfg.m, seed=z)
    want = _want(memory, hot, table, tokens, cfg)
    cpu = torch.device("cpu")
    fused = implementation(cpu, "cpp").embed(memory, hot, table, tokens, c, cfg)
    composed = implementation(cpu, "torch").embed(memory, hot, table, tokens, c, cfg)
    op = hot_embed(memory, hot, table, tokens, c, cfg)
    for got in (fused, composed, op):
        assert got.shape == (67, 26, 16) and got.dtype == dtype
        assert torch.equal(_bits(got), _bits(want))
    # Both kinds of token are in the case: some hot, some hashed.
    index = key_lookup_reference(tokens, torch.tensor(-1), table)
    assert 0 < int((index >= 0).sum()) < index.numel()


def test_all_cold_no_hot_rows_and_empty(native: None) -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1031, seed=2)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(0, (9, 26), torch.float32, cfg.m, seed=1)
    assert hot.shape[0] == 0
    got = hot_embed(memory, hot, table, tokens, c, cfg)
    assert torch.equal(got, _want(memory, hot, table, tokens, cfg))
    empty = hot_embed(memory, hot, table, tokens[:0], c, cfg)
    assert empty.shape == (0, 26, 16)


def test_chunk_boundaries_and_threads(native: None) -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=True, m=4099, seed=3)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(2000, (40001,), torch.float32, cfg.m, seed=7)
    want = _want(memory, hot, table, tokens, cfg)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n in (1, 255, 256, 257, 40001):
                got = hot_embed(memory, hot, table, tokens[:n], c, cfg)
                assert torch.equal(got, want[:n]), (threads, n)
    finally:
        torch.set_num_threads(old)


def test_table_pointing_past_the_hot_rows_is_refused(native: None) -> None:
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1031, seed=2)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(50, (4, 26), torch.float32, cfg.m, seed=4, hot_share=1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        hot_embed(memory, hot[:3], table, tokens, c, cfg)
    with pytest.raises(ValueError, match="key table"):
        hot_embed(memory, hot, table[:, :1].contiguous(), tokens, c, cfg)
    with pytest.raises(RuntimeError, match="does not fit its own header"):  # truncated table
        hot_embed(memory, hot, table[:-1].contiguous(), tokens, c, cfg)


def test_onnx_translation_matches(native: None, tmp_path) -> None:  # noqa: ANN001
    ort = pytest.importorskip("onnxruntime")
    from model_export import onnx_op

    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=2053, seed=5)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(300, (33, 26), torch.float32, cfg.m, seed=9)

    class M(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return hot_embed(memory, hot, table, t, c, cfg)

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    prog = torch.export.export(M(), (tokens[:4],), dynamic_shapes=({0: batch},))
    path = tmp_path / "hot_embed.onnx"
    onnx_op.export_onnx(prog, (tokens[:4],), path, ["tokens"], ["rows"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"tokens": tokens.numpy()})[0]
    assert np.array_equal(got.view(np.int32), _want(memory, hot, table, tokens, cfg).numpy()
                          .view(np.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cuda_matches_cpu(mode: str, z: int, aligned: bool) -> None:
    # On CUDA the op is composed: the Triton key lookup, then the hot gather (Triton cold rows).
    cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=aligned, m=2053, seed=5)
    c = cfg.param_tensors()
    memory, hot, table, tokens = _case(300, (67, 26), torch.float32, cfg.m, seed=z)
    want = _want(memory, hot, table, tokens, cfg)
    dev = torch.device("cuda")
    got = hot_embed(memory.to(dev), hot.to(dev), table.to(dev), tokens.to(dev),
                    c.to(dev), cfg)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
