"""``lma::dot_interaction`` (DLRM's pairwise dot products behind the bottom MLP's output): the C++
kernel against the composed form (concatenate, bmm, gather), its gradient, its fallbacks, its
export (torch.export, ONNX through onnxruntime) and its use by the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lma.ops import _native
from lma.ops.interaction import dot_interaction, dot_interaction_reference


def _pairs(n: int, offset: int = 1) -> torch.Tensor:
    iu = torch.triu_indices(n, n, offset)
    return iu[0] * n + iu[1]


@pytest.fixture
def native() -> None:
    if _native.native_module() is None:
        pytest.skip(f"native kernels unavailable: {_native.native_error()}")


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64, 1000])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_kernel_matches_composed_form(native: None, rows: int, with_prefix: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    vecs = torch.randn(rows, 26, 16, generator=g)
    prefix = torch.randn(rows, 16, generator=g) if with_prefix else None
    pairs = _pairs(26 + int(with_prefix))
    ext = _native.native_module()
    empty = vecs.new_empty((rows, 0))
    got = ext.dot_interaction(empty if prefix is None else prefix, vecs, pairs)
    want = dot_interaction_reference(vecs, pairs, prefix)
    assert got.shape == want.shape == (rows, (16 if with_prefix else 0) + len(pairs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if prefix is not None:
        assert torch.equal(got[:, :16], prefix)  # copied, not computed
    # The op dispatches to the kernel here: the same bits.
    assert torch.equal(dot_interaction(vecs, pairs, prefix), got)


def test_any_pair_positions_and_odd_sizes(native: None) -> None:
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(13, 5, 3, generator=g)
    prefix = torch.randn(13, 3, generator=g)
    pairs = torch.tensor([0, 7, 35, 6, 13, 1, 29], dtype=torch.int64)  # diagonal, both halves
    torch.testing.assert_close(dot_interaction(vecs, pairs, prefix),
                               dot_interaction_reference(vecs, pairs, prefix))


def test_exact_sum_order_is_the_documented_one(native: None) -> None:
    # Each product is the float32 sum over k = 0..d-1 of separate multiplies, in order.
    g = torch.Generator().manual_seed(2)
    vecs = torch.randn(9, 4, 16, generator=g) * 1e3
    pairs = _pairs(4)
    got = dot_interaction(vecs, pairs)
    a, b = vecs.numpy()[:, [0, 0, 0, 1, 1, 2]], vecs.numpy()[:, [1, 2, 3, 2, 3, 3]]
    acc = np.zeros(a.shape[:2], dtype=np.float32)
    for k in range(16):
        acc = (acc + (a[..., k] * b[..., k]).astype(np.float32)).astype(np.float32)
    assert np.array_equal(got.numpy(), acc)


def test_gradient_matches_composed_form() -> None:
    g = torch.Generator().manual_seed(3)
    for with_prefix in (True, False):
        vecs = torch.randn(11, 6, 4, generator=g, requires_grad=True)
        prefix = torch.randn(11, 4, generator=g, requires_grad=True) if with_prefix else None
        pairs = _pairs(6 + int(with_prefix))
        inputs = [vecs] + ([prefix] if with_prefix else [])
        up = torch.randn(11, (4 if with_prefix else 0) + len(pairs), generator=g)
        got = torch.autograd.grad(dot_interaction(vecs, pairs, prefix), inputs, up)
        want = torch.autograd.grad(dot_interaction_reference(vecs, pairs, prefix), inputs, up)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    v64 = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    p64 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, p: dot_interaction(v, _pairs(5), p), (v64, p64))


def test_fallbacks_are_the_composed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    vecs = torch.randn(10, 26, 16, generator=g)
    prefix = torch.randn(10, 16, generator=g)
    pairs = _pairs(27)
    # Other dtypes take the composed form, bit for bit.
    for dt in (torch.float64, torch.bfloat16):
        got = dot_interaction(vecs.to(dt), pairs, prefix.to(dt))
        assert torch.equal(got, dot_interaction_reference(vecs.to(dt), pairs, prefix.to(dt)))
    monkeypatch.setenv("LMA_DISABLE_NATIVE_OPS", "1")
    _native.reset()
    try:
        assert torch.equal(dot_interaction(vecs, pairs, prefix),
                           dot_interaction_reference(vecs, pairs, prefix))
    finally:
        monkeypatch.delenv("LMA_DISABLE_NATIVE_OPS")
        _native.reset()


def test_bad_inputs_are_refused() -> None:
    vecs = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="vecs must be"):
        dot_interaction(vecs[0], _pairs(3))
    with pytest.raises(ValueError, match="prefix must be"):
        dot_interaction(vecs, _pairs(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="pairs must be"):
        dot_interaction(vecs, _pairs(3).int())


def test_exports_to_torch_program_and_onnx(native: None, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from model_export import onnx_op

    pairs = _pairs(27)

    class M(torch.nn.Module):
        def forward(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return dot_interaction(v, pairs, x)

    g = torch.Generator().manual_seed(5)
    vecs, prefix = torch.randn(50, 26, 16, generator=g), torch.randn(50, 16, generator=g)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    prog = torch.export.export(M(), (vecs[:4], prefix[:4]),
                               dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(n.target) for n in prog.graph.nodes if n.op == "call_function"}
    assert "lma.dot_interaction.default" in targets
    assert torch.equal(prog.module()(vecs, prefix), dot_interaction(vecs, pairs, prefix))
    path = tmp_path / "inter.onnx"
    onnx_op.export_onnx(prog, (vecs[:4], prefix[:4]), path, ["vecs", "x"], ["out"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"vecs": vecs.numpy(), "x": prefix.numpy()})[0]
    assert got.shape == (50, 16 + 351)
    np.testing.assert_allclose(got, dot_interaction_reference(vecs, pairs, prefix).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_the_composed_form() -> None:
    g = torch.Generator().manual_seed(6)
    vecs, prefix = torch.randn(64, 26, 16, generator=g), torch.randn(64, 16, generator=g)
    pairs = _pairs(27)
    got = dot_interaction(vecs.cuda(), pairs.cuda(), prefix.cuda()).cpu()
    torch.testing.assert_close(got, dot_interaction_reference(vecs, pairs, prefix),
                               rtol=1e-5, atol=1e-5)
