"""The hashed-gather custom op: C++ / Triton / torch reference / numpy hash spec agree bit for bit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lma import hashspec
from lma.ops import (
    HashedGatherConfig,
    _native,
    backend_for,
    hashed_gather,
    hashed_gather_backward_reference,
    hashed_gather_reference,
    slot_indices,
    slot_indices_torch,
)
from tests.triton_interpreter import run_interpreted

REPO = Path(__file__).resolve().parents[1]
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EXTREME = [0, -1, 1, I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, 0xFFFF, -0x10000, 1 << 32]

CASES = [
    (mode, z, aligned) for mode in ("lma", "robez") for z in (1, 4, 16) for aligned in (False, True)
]


def _keys(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(I64_MIN, I64_MAX, shape, dtype=torch.int64, generator=g)
    flat = k.view(-1)
    n = min(len(EXTREME), flat.numel())
    flat[:n] = torch.tensor(EXTREME[:n], dtype=torch.int64)
    return k


def _cfg(mode: str, z: int, aligned: bool, m: int = 4099, dim: int = 16) -> HashedGatherConfig:
    return HashedGatherConfig(dim=dim, z=z, mode=mode, aligned=aligned, m=m, seed=7)


@pytest.fixture
def native() -> None:
    if _native.native_module() is None:
        pytest.skip(f"native kernels unavailable: {_native.native_error()}")


@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cpp_indices_match_numpy_spec_and_torch(
    native: None, mode: str, z: int, aligned: bool
) -> None:
    cfg = _cfg(mode, z, aligned)
    a, b, w = cfg.param_tensors()
    keys = _keys((37, 26), seed=z).reshape(-1)
    want = hashspec.slot_indices(keys.numpy(), cfg.params(), cfg.m, z, mode, aligned)
    ref = slot_indices_torch(keys, (a, b, w), cfg)
    cpp = slot_indices(keys, (a, b, w), cfg, backend="cpp")
    assert np.array_equal(ref.numpy(), want)
    assert np.array_equal(cpp.numpy(), want)
    assert cpp.min() >= 0 and cpp.max() < cfg.m
    if aligned:
        assert (cpp[:, ::z] % z == 0).all()


@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cpp_forward_and_backward_match_reference(
    native: None, mode: str, z: int, aligned: bool
) -> None:
    cfg = _cfg(mode, z, aligned, m=1031)
    a, b, w = cfg.param_tensors()
    keys = _keys((64, 26), seed=100 + z)
    assert backend_for(torch.device("cpu")) == "cpp"
    mem = torch.randn(cfg.m, requires_grad=True)
    out = hashed_gather(mem, keys, (a, b, w), cfg)
    ref = hashed_gather_reference(mem, keys, (a, b, w), cfg)
    assert out.shape == (64, 26, 16)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, mem, g)
    want = hashed_gather_backward_reference(g, keys, (a, b, w), cfg)
    # Explicit scatter-add from the numpy spec's indices.
    idx = hashspec.slot_indices(keys.reshape(-1).numpy(), cfg.params(), cfg.m, z, mode, aligned)
    manual = np.zeros(cfg.m, dtype=np.float64)
    np.add.at(manual, idx.reshape(-1), g.reshape(-1).double().numpy())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.double().numpy(), manual, atol=1e-4)


@pytest.mark.parametrize("strategy", ["serial", "owner", "partials", "auto"])
def test_cpp_backward_strategies_agree(native: None, strategy: str) -> None:
    cfg = _cfg("robez", 4, False, m=5000)
    a, b, w = cfg.param_tensors()
    keys = _keys((512, 26), seed=3)
    g = torch.randn(512, 26, 16, dtype=torch.float64)
    want = hashed_gather_backward_reference(g, keys, (a, b, w), cfg)
    ext = _native.native_module()
    got = ext.backward(g, keys, a, b, w, cfg.m, 16, 4, False, False, strategy)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode,z", [("lma", 4), ("robez", 1), ("robez", 16)])
def test_gradcheck(mode: str, z: int) -> None:
    cfg = _cfg(mode, z, False, m=97)
    a, b, w = cfg.param_tensors()
    keys = _keys((3, 5), seed=11)
    mem = torch.randn(cfg.m, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m: hashed_gather(m, keys, (a, b, w), cfg), (mem,)
    )


def test_double_and_empty_batch(native: None) -> None:
    cfg = _cfg("lma", 4, True, m=256)
    a, b, w = cfg.param_tensors()
    mem = torch.randn(cfg.m, dtype=torch.float64)
    keys = torch.zeros((0, 26), dtype=torch.int64)
    assert hashed_gather(mem, keys, (a, b, w), cfg).shape == (0, 26, 16)
    keys = _keys((2, 3))
    out = hashed_gather(mem, keys, (a, b, w), cfg)
    assert out.dtype == torch.float64
    assert torch.equal(out, hashed_gather_reference(mem, keys, (a, b, w), cfg))


def test_bad_arguments_raise() -> None:
    cfg = _cfg("robez", 4, False)
    a, b, w = cfg.param_tensors()
    mem = torch.randn(cfg.m)
    with pytest.raises(TypeError, match="int64"):
        hashed_gather(mem, torch.zeros(2, 3, dtype=torch.int32), (a, b, w), cfg)
    with pytest.raises(ValueError, match="mode"):
        hashed_gather(mem, torch.zeros(2, 3, dtype=torch.int64), (a, b, w),
                      HashedGatherConfig(dim=16, z=4, mode="bogus", aligned=False, m=cfg.m))
    with pytest.raises(ValueError, match="Z"):
        hashed_gather(mem, torch.zeros(2, 3, dtype=torch.int64), (a, b, w),
                      HashedGatherConfig(dim=16, z=8, mode="robez", aligned=False, m=cfg.m))
    with pytest.raises(ValueError, match="mode"):  # the op's own check of its flat arguments
        torch.ops.lma.hashed_gather(mem, torch.zeros(2, 3, dtype=torch.int64), a, b, w, 16, 4,
                                    "bogus", False)


class _Tiny(nn.Module):
    def __init__(self, mode: str, z: int) -> None:
        super().__init__()
        self.cfg = _cfg(mode, z, False, m=2048)
        a, b, w = self.cfg.param_tensors()
        self.register_buffer("coef_a", a)
        self.register_buffer("coef_b", b)
        self.register_buffer("nibble_w", w)
        self.memory = nn.Parameter(torch.randn(self.cfg.m) * 0.1)
        self.head = nn.Linear(16, 1)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        e = hashed_gather(self.memory, keys, (self.coef_a, self.coef_b, self.nibble_w), self.cfg)
        return self.head(e.sum(1)).squeeze(-1)


@pytest.mark.parametrize("mode,z", [("lma", 4), ("robez", 1)])
def test_torch_compile_forward_backward(mode: str, z: int) -> None:
    torch._dynamo.reset()
    model = _Tiny(mode, z)
    keys = _keys((8, 26), seed=5)
    eager = model(keys)
    eager.sum().backward()
    g_eager = model.memory.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(keys)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(model.memory.grad, g_eager)


def test_torch_export_roundtrip(tmp_path: Path) -> None:
    model = _Tiny("lma", 4).eval()
    keys = _keys((4, 26), seed=9)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(model, (keys,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lma.hashed_gather.default" in targets
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    keys2 = _keys((9, 26), seed=10)
    torch.testing.assert_close(loaded.module()(keys2), model(keys2))


def test_fallback_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg("lma", 4, False)
    a, b, w = cfg.param_tensors()
    keys = _keys((16, 26))
    mem = torch.randn(cfg.m, requires_grad=True)
    monkeypatch.setenv(_native.DISABLE_ENV, "1")
    try:
        assert backend_for(torch.device("cpu")) == "torch"
        out = hashed_gather(mem, keys, (a, b, w), cfg)
        assert torch.equal(out, hashed_gather_reference(mem, keys, (a, b, w), cfg))
        out.sum().backward()
        assert mem.grad is not None and mem.grad.sum().item() == pytest.approx(
            out.numel(), rel=1e-4
        )
    finally:
        monkeypatch.delenv(_native.DISABLE_ENV)
        _native.reset()


def test_fallback_warns_without_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    _native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="lma.ops._native"):
            assert backend_for(torch.device("cpu")) == "torch"
        assert any("pure-torch" in r.getMessage() for r in caplog.records)
        cfg = _cfg("robez", 1, False)
        a, b, w = cfg.param_tensors()
        keys = _keys((4, 26))
        mem = torch.randn(cfg.m)
        out = hashed_gather(mem, keys, (a, b, w), cfg)
        assert torch.equal(out, hashed_gather_reference(mem, keys, (a, b, w), cfg))
    finally:
        monkeypatch.undo()
        _native.reset()


def test_env_var_in_fresh_process() -> None:
    code = "import torch; from lma.ops import backend_for; print(backend_for(torch.device('cpu')))"
    env = dict(os.environ, LMA_DISABLE_NATIVE_OPS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "torch"


def test_triton_kernels_in_interpreter() -> None:
    """The GPU kernels run in Triton's CPU interpreter where triton is installed."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from lma import hashspec
        from lma.ops import HashedGatherConfig, hashed_gather_reference, hashed_gather_backward_reference
        from lma.ops import triton_kernels as tk
        for mode in ("lma", "robez"):
            for z, dim in ((1, 16), (4, 16), (16, 16), (3, 12)):
                for al in (False, True):
                    cfg = HashedGatherConfig(dim=dim, z=z, mode=mode, aligned=al, m=1000 + z, seed=3)
                    a, b, w = cfg.param_tensors()
                    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (5, 7), dtype=torch.int64)
                    keys.view(-1)[:4] = torch.tensor([0, -1, -(1 << 63), (1 << 63) - 1])
                    idx = tk.slot_indices(keys, (a, b, w), cfg)
                    want = hashspec.slot_indices(keys.view(-1).numpy(), cfg.params(), cfg.m, z, mode, al)
                    assert np.array_equal(idx.numpy(), want), (mode, z, al)
                    mem = torch.randn(cfg.m)
                    out = tk.forward(mem, keys, (a, b, w), cfg)
                    assert torch.equal(out, hashed_gather_reference(mem, keys, (a, b, w), cfg))
                    g = torch.randn_like(out)
                    got = tk.backward(g, keys, (a, b, w), cfg)
                    ref = hashed_gather_backward_reference(g, keys, (a, b, w), cfg)
                    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        print("ok")
        """
    )
    assert run_interpreted(code).strip().endswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cuda_matches_cpu(mode: str, z: int, aligned: bool) -> None:
    cfg = _cfg(mode, z, aligned, m=1 << 16)
    a, b, w = cfg.param_tensors()
    keys = _keys((256, 26), seed=z)
    mem = torch.randn(cfg.m, requires_grad=True)
    mem_cuda = mem.detach().cuda().requires_grad_()
    idx = slot_indices(keys.cuda(), (a, b, w), cfg)
    assert torch.equal(
        idx.cpu(), slot_indices_torch(keys.view(-1), (a, b, w), cfg)
    )
    out = hashed_gather(mem_cuda, keys.cuda(), (a, b, w), cfg)
    ref = hashed_gather_reference(mem, keys, (a, b, w), cfg)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=0)
    g = torch.randn_like(ref)
    (gc,) = torch.autograd.grad(out, mem_cuda, g.cuda())
    (gr,) = torch.autograd.grad(ref, mem, g)
    torch.testing.assert_close(gc.cpu(), gr, atol=1e-5, rtol=1e-5)
