"""``lma::hot_gather``, the hot-token serving form of the hashed gather: every implementation
gives ``hot[index]`` on hot tokens and exactly ``lma::hashed_gather`` on cold ones."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lma.ops import (
    HashedGatherConfig,
    _native,
    hashed_gather,
    hashed_gather_reference,
    hot_gather,
    hot_gather_reference,
    implementation,
)
from tests.test_ops import CASES, EXTREME, I64_MAX, I64_MIN
from tests.triton_interpreter import run_interpreted


def _cfg(mode: str, z: int, aligned: bool, m: int = 2053, dim: int = 16) -> HashedGatherConfig:
    return HashedGatherConfig(dim=dim, z=z, mode=mode, aligned=aligned, m=m, seed=11)


def _inputs(shape: tuple[int, ...], n_hot: int, dim: int, dtype: torch.dtype, m: int,
            hot_share: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """memory, hot rows, index (about ``hot_share`` hot, -1 elsewhere), keys (extremes first)."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(m, generator=g).to(dtype)
    hot = torch.randn(n_hot, dim, generator=g).to(dtype)
    keys = torch.randint(I64_MIN, I64_MAX, shape, dtype=torch.int64, generator=g)
    flat = keys.view(-1)
    k = min(len(EXTREME), flat.numel())
    flat[:k] = torch.tensor(EXTREME[:k], dtype=torch.int64)
    index = torch.full(shape, -1, dtype=torch.int64)
    if n_hot:
        pick = torch.rand(shape, generator=g) < hot_share
        index[pick] = torch.randint(0, n_hot, (int(pick.sum()),), generator=g)
    return memory, hot, index, keys


def _want(memory: torch.Tensor, hot: torch.Tensor, index: torch.Tensor, keys: torch.Tensor,
          cfg: HashedGatherConfig) -> torch.Tensor:
    """hot[index] where hot, the hashed gather of all keys (reference) where cold."""
    full = hashed_gather_reference(memory, keys, cfg.param_tensors(), cfg.with_m(memory.shape[0]))
    rows = hot[index.clamp(min=0)] if hot.shape[0] else torch.zeros_like(full)
    return torch.where((index >= 0)[..., None], rows, full)


@pytest.fixture
def native() -> None:
    if _native.native_module() is None:
        pytest.skip(f"native kernels unavailable: {_native.native_error()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cpp_and_reference_match_hashed_gather(native: None, mode: str, z: int, aligned: bool,
                                               dtype: torch.dtype) -> None:
    cfg = _cfg(mode, z, aligned)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((67, 26), 50, 16, dtype, cfg.m, seed=z)
    want = _want(memory, hot, index, keys, cfg)
    ref = hot_gather_reference(memory, hot, index, keys, consts, cfg)
    cpp = implementation(torch.device("cpu"), "cpp").hot_gather(memory, hot, index, keys,
                                                                  consts, cfg)
    op = hot_gather(memory, hot, index, keys, consts, cfg)  # the dispatch: C++ here
    for got in (ref, cpp, op):
        assert got.dtype == dtype and got.shape == (67, 26, 16)
        assert torch.equal(got.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.float16 else torch.int32))
    # The cold rows are the op's own hashed gather (C++), bit for bit.
    cold = index < 0
    assert torch.equal(op[cold], hashed_gather(memory, keys, consts, cfg)[cold])


@pytest.mark.parametrize("hot_share", [0.0, 1.0])
def test_all_cold_all_hot_and_no_hot_rows(native: None, hot_share: float) -> None:
    cfg = _cfg("lma", 4, False)
    consts = cfg.param_tensors()
    for n_hot in (0, 7):
        memory, hot, index, keys = _inputs((33, 5), n_hot, 16, torch.float32, cfg.m,
                                           hot_share=hot_share, seed=n_hot)
        want = _want(memory, hot, index, keys, cfg)
        for backend in ("cpp", "torch"):
            got = implementation(torch.device("cpu"), backend).hot_gather(
                memory, hot, index, keys, consts, cfg)
            assert torch.equal(got, want), (backend, n_hot)


def test_shapes_one_dim_and_empty(native: None) -> None:
    cfg = _cfg("robez", 4, True)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((300,), 9, 16, torch.float32, cfg.m, seed=3)
    assert torch.equal(hot_gather(memory, hot, index, keys, consts, cfg),
                       _want(memory, hot, index, keys, cfg))
    empty = torch.zeros(0, 26, dtype=torch.int64)
    for backend in ("cpp", "torch"):
        out = implementation(torch.device("cpu"), backend).hot_gather(
            memory, hot, empty, empty, consts, cfg)
        assert out.shape == (0, 26, 16)


def test_chunk_boundaries_and_threads(native: None) -> None:
    """More tokens than one chunk of the C++ kernel, over several threads."""
    cfg = _cfg("lma", 4, False, m=1 << 14)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((1000, 26), 500, 16, torch.float32, cfg.m, seed=5)
    want = _want(memory, hot, index, keys, cfg)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(hot_gather(memory, hot, index, keys, consts, cfg), want)
    finally:
        torch.set_num_threads(old)


def test_fallback_when_native_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg("lma", 16, False)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((20, 26), 12, 16, torch.float32, cfg.m)
    monkeypatch.setenv(_native.DISABLE_ENV, "1")
    try:
        assert torch.equal(hot_gather(memory, hot, index, keys, consts, cfg),
                           _want(memory, hot, index, keys, cfg))
    finally:
        monkeypatch.delenv(_native.DISABLE_ENV)
        _native.reset()


def test_bad_inputs_are_refused(native: None) -> None:
    cfg = _cfg("lma", 4, False)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((4, 3), 5, 16, torch.float32, cfg.m)
    with pytest.raises(TypeError, match="dtype"):
        hot_gather(memory, hot.half(), index, keys, consts, cfg)
    with pytest.raises(ValueError, match=r"hot must be \(H, dim=16\)"):
        hot_gather(memory, hot[:, :8], index, keys, consts, cfg)
    with pytest.raises(ValueError, match="same shape"):
        hot_gather(memory, hot, index[:2], keys, consts, cfg)
    with pytest.raises(TypeError, match="index must be int64"):
        hot_gather(memory, hot, index.int(), keys, consts, cfg)
    bad = index.clone()
    bad[1, 1] = 5
    with pytest.raises(RuntimeError, match="out of range"):
        hot_gather(memory, hot, bad, keys, consts, cfg)


def test_backward_raises() -> None:
    cfg = _cfg("lma", 4, False)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((4, 3), 5, 16, torch.float32, cfg.m)
    memory.requires_grad_()
    out = hot_gather(memory, hot, index, keys, consts, cfg)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


class _Hot(torch.nn.Module):
    def __init__(self, cfg: HashedGatherConfig, memory: torch.Tensor, hot: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.memory = torch.nn.Parameter(memory, requires_grad=False)
        self.register_buffer("hot", hot)
        a, b, w = cfg.param_tensors()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.register_buffer("w", w)

    def forward(self, index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return hot_gather(self.memory, self.hot, index, keys, (self.a, self.b, self.w), self.cfg)


def test_torch_export_traces_and_runs(native: None, tmp_path: Path) -> None:
    cfg = _cfg("lma", 4, False)
    memory, hot, index, keys = _inputs((8, 26), 30, 16, torch.float32, cfg.m)
    model = _Hot(cfg, memory, hot)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        ep = torch.export.export(model, (index, keys), dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lma.hot_gather.default" in targets
    path = tmp_path / "hot.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    _, _, index2, keys2 = _inputs((13, 26), 30, 16, torch.float32, cfg.m, seed=9)
    assert torch.equal(loaded.module()(index2, keys2), _want(memory, hot, index2, keys2, cfg))


def test_triton_composition_in_interpreter() -> None:
    """The CUDA path (cold tokens through the Triton gather) in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from lma.ops import HashedGatherConfig, hot_gather_reference
        from lma.ops import triton_kernels as tk
        from lma.ops.reference import compose_hot_gather
        gather = compose_hot_gather(tk.forward)
        for mode in ("lma", "robez"):
            for z, al in ((1, False), (4, False), (4, True), (16, False)):
                cfg = HashedGatherConfig(dim=16, z=z, mode=mode, aligned=al, m=999, seed=3)
                c = cfg.param_tensors()
                mem = torch.randn(cfg.m)
                for n_hot in (0, 6):
                    hot = torch.randn(n_hot, 16)
                    keys = torch.randint(-(1 << 63), (1 << 63) - 1, (5, 7), dtype=torch.int64)
                    keys.view(-1)[:4] = torch.tensor([0, -1, -(1 << 63), (1 << 63) - 1])
                    index = torch.full((5, 7), -1, dtype=torch.int64)
                    if n_hot:
                        index[::2] = torch.randint(0, n_hot, index[::2].shape)
                    got = gather(mem, hot, index, keys, c, cfg)
                    want = hot_gather_reference(mem, hot, index, keys, c, cfg)
                    assert torch.equal(got, want), (mode, z, al, n_hot)
        print("ok")
        """
    )
    assert run_interpreted(code).strip().endswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode,z,aligned", CASES)
def test_cuda_matches_cpu(mode: str, z: int, aligned: bool) -> None:
    cfg = _cfg(mode, z, aligned, m=1 << 16)
    consts = cfg.param_tensors()
    memory, hot, index, keys = _inputs((256, 26), 100, 16, torch.float32, cfg.m, seed=z)
    got = hot_gather(memory.cuda(), hot.cuda(), index.cuda(), keys.cuda(), consts, cfg)
    assert torch.equal(got.cpu(), _want(memory, hot, index, keys, cfg))


# ---------------------------------------------------------------- the LMA hot serving form


@pytest.fixture(scope="module")
def lma_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LMA 16x model trained (one short epoch) on real Criteo rows."""
    from lma.train import TrainConfig, train_model
    from tests.conftest import shared_data_root

    data = shared_data_root() / "criteo" / "train_10k.tsv"
    if not data.is_file():
        pytest.skip(f"real Criteo rows not found at {data} (set LMA_SHARED_DATA)")
    out = tmp_path_factory.mktemp("hot") / "ck_lma"
    train_model(TrainConfig(data=f"criteo:{data}", embedding="lma", compression=16.0, epochs=1,
                            epoch_rows=2048, batch_size=256, progress=False, threads=1,
                            out=str(out)))
    return out


def _rows(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Criteo rows (the training file's first 1500), then 200 rows of tokens never seen."""
    from lma.checkpoint import load_checkpoint
    from lma.data import open_source

    ck = load_checkpoint(checkpoint)
    data = open_source(str(ck.config["train_config"]["data"])).read_all()
    dense = torch.from_numpy(data.dense[:1700].copy())
    tokens = torch.from_numpy(data.tokens[:1700].copy())
    g = torch.Generator().manual_seed(1)
    tokens[1500:] = torch.randint(I64_MIN, I64_MAX, tokens[1500:].shape, dtype=torch.int64,
                                  generator=g)
    return dense, tokens


def _hot_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    hot = copy.deepcopy(model)
    hot.embedding.to_serving("hot")
    return hot.eval()


def test_hot_form_logits_bit_identical(native: None, lma_checkpoint: Path) -> None:
    from lma.checkpoint import load_checkpoint

    model = load_checkpoint(lma_checkpoint).model.eval()
    hot = _hot_copy(model)
    emb = hot.embedding
    assert emb.serve == "hot" and model.embedding.serve == "hash"
    assert emb.hot.shape == (model.embedding.n_signed, 16) and emb.hot.dtype == torch.float32
    assert emb.extra_state_arrays() == {} and emb.key_table is None
    dense, tokens = _rows(lma_checkpoint)
    index = emb.hot_index(tokens)
    # Both paths are exercised: most real occurrences are signed, the unseen rows are all cold.
    assert 0.3 < float((index[:1500] >= 0).float().mean()) < 1.0
    assert bool((index[1500:] < 0).all())
    with torch.no_grad():
        want, got = model(dense, tokens), hot(dense, tokens)
    assert torch.equal(got, want)
    # The embedding rows themselves, bit for bit.
    with torch.no_grad():
        assert torch.equal(emb(tokens), model.embedding(tokens))
    # Serving bytes count the hot rows and their key table (no signature table any more).
    assert emb.state_bytes() == emb.hot.numel() * 4 + emb.hot_lookup.nbytes()


def test_hot_form_float16_memory(native: None, lma_checkpoint: Path) -> None:
    import copy

    from lma.checkpoint import load_checkpoint

    model = load_checkpoint(lma_checkpoint).model.eval()
    half = copy.deepcopy(model)
    half.embedding.memory.data = half.embedding.memory.data.half()
    hot = _hot_copy(half)
    assert hot.embedding.hot.dtype == torch.float16
    dense, tokens = _rows(lma_checkpoint)
    with torch.no_grad():
        assert torch.equal(hot(dense, tokens), half(dense, tokens))


def test_hot_form_without_signed_tokens(native: None) -> None:
    """H = 0: an LMA embedding without signatures has no hot rows and hashes every token."""
    import copy

    from lma.embeddings import EmbeddingSpec
    from lma.embeddings.lma import LMAEmbedding
    from lma.signatures import SignatureTable

    emb = LMAEmbedding(EmbeddingSpec("lma", 16, 4096, seed=3), SignatureTable.empty()).eval()
    hot_emb = copy.deepcopy(emb).to_serving("hot")
    assert hot_emb.hot.shape == (0, 16)
    _, _, _, keys = _inputs((50, 26), 0, 16, torch.float32, 10)
    with torch.no_grad():
        assert torch.equal(hot_emb(keys), emb(keys))


def test_hot_form_rebuilds_from_weights_and_exports(native: None, lma_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """The stored hot form (config with serve=hot, state dict) rebuilds on the meta device
    without signatures, and torch.export traces it into one lma::hot_gather."""
    from lma.checkpoint import load_checkpoint
    from lma.rebuild import rebuild_model

    ck = load_checkpoint(lma_checkpoint)
    model = ck.model.eval()
    hot = _hot_copy(model)
    cfg = hot.embedding.config()
    assert cfg["options"]["serve"] == "hot"
    weights = {k: v.clone() for k, v in hot.state_dict().items()}
    assert "embedding.hot" in weights and "embedding.hot_lookup.table" in weights
    assert not any(k.startswith("embedding.key_table.") for k in weights)
    rebuilt = rebuild_model(ck.config["model_config"], cfg, ck.feature_map, {},
                            weights=weights).eval()
    assert rebuilt.embedding.serve == "hot" and not rebuilt.embedding.hot.is_meta
    dense, tokens = _rows(lma_checkpoint)
    with torch.no_grad():
        want = model(dense, tokens)
        assert torch.equal(rebuilt(dense, tokens), want)
        batch = torch.export.Dim("batch", min=1, max=1 << 24)
        ep = torch.export.export(hot, (dense[:8], tokens[:8]),
                                 dynamic_shapes=({0: batch}, {0: batch}))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lma.hot_embed.default" in targets and "lma.hashed_gather.default" not in targets
    torch.export.save(ep, tmp_path / "hot.pt2")
    with torch.no_grad():
        assert torch.equal(torch.export.load(tmp_path / "hot.pt2").module()(dense, tokens), want)


def test_hot_form_refusals(native: None, lma_checkpoint: Path) -> None:
    from lma.checkpoint import load_checkpoint
    from lma.embeddings import EmbeddingSpec
    from lma.embeddings.lma import LMAEmbedding
    from lma.signatures import SignatureTable

    model = load_checkpoint(lma_checkpoint).model
    hot = _hot_copy(model)
    _, tokens = _rows(lma_checkpoint)
    hot.embedding.train()
    with pytest.raises(RuntimeError, match="inference only"):
        hot.embedding(tokens)
    with pytest.raises(ValueError, match="cannot be turned back"):
        hot.embedding.to_serving("hash")
    with pytest.raises(ValueError, match="serving form must be one of"):
        model.embedding.to_serving("cold")
    with pytest.raises(ValueError, match="option serve must be one of"):
        LMAEmbedding(EmbeddingSpec("lma", 16, 4096, options={"serve": "x"}),
                     SignatureTable.empty())
    placeholder = LMAEmbedding(EmbeddingSpec("lma", 16, 4096, options={"serve": "hot"}),
                               SignatureTable.empty()).eval()
    with pytest.raises(RuntimeError, match="without its hot rows"):
        placeholder(tokens)


# ---------------------------------------------------------------- hot-form bundles


@pytest.fixture(scope="module")
def hot_bundles(lma_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Path]:
    """The same checkpoint exported in the hot form (float32 and float16, with the torch
    program) and in the hash form."""
    from model_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("hot_bundles")
    return {
        "hot": export_bundle(lma_checkpoint, root / "hot", sample_rows=128, torch_program=True,
                             lma_serving="hot"),
        "hot16": export_bundle(lma_checkpoint, root / "hot16", sample_rows=128,
                               dtype="float16", lma_serving="hot"),
        "hash": export_bundle(lma_checkpoint, root / "hash", sample_rows=128,
                              lma_serving="hash"),
    }


def test_hot_bundle_layout_and_manifest(native: None, hot_bundles: dict[str, Path]) -> None:
    import onnx

    from model_export.bundle import load_bundle

    hot, hashed = load_bundle(hot_bundles["hot"]), load_bundle(hot_bundles["hash"])
    assert hot.lma_serving == "hot" and hashed.lma_serving == "hash"
    assert hot.manifest["embedding"]["config"]["options"]["serve"] == "hot"
    # Each byte once: no signature table beside the hot rows' key table.
    assert "embedding_state.npz" not in hot.manifest["files"]
    assert "embedding_state.npz" in hashed.manifest["files"]
    names = set(hot.weights())
    assert {"embedding.hot", "embedding.hot_lookup.table", "embedding.memory"} <= names
    assert not any(n.startswith("embedding.key_table.") for n in names)
    model = onnx.load(str(hot.onnx_path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node if n.domain == "ai.lma"]
    assert "HotGather" in ops and "HashedGather" not in ops
    # Bytes: the hot rows are embedding bytes, their key table the key lookup.
    eager = hot.eager_model().embedding
    comp = hot.component_bytes()
    assert comp["embedding"] == 4 * (eager.memory.numel() + eager.hot.numel())
    # (plus the hash constants and the table header: under 1 KB)
    assert 0 <= comp["key_lookup"] - eager.hot_lookup.nbytes() < 1024
    assert hot.manifest["parameters"]["embedding_state"]["bytes"] == eager.state_bytes()


def test_hot_bundle_engines_agree_with_hash_bundle(native: None, lma_checkpoint: Path,
                                                   hot_bundles: dict[str, Path]) -> None:
    """Every engine of the hot bundle gives the hash bundle's logits: bit for bit in torch, within
    verify's tolerance in onnxruntime; lma verify passes on both forms and on float16."""
    import onnxruntime as ort

    from model_export.bundle import load_bundle
    from model_export.verify import TOLERANCE, verify_bundle

    hot, hashed = load_bundle(hot_bundles["hot"]), load_bundle(hot_bundles["hash"])
    dense, tokens = _rows(lma_checkpoint)
    with torch.no_grad():
        want = hashed.eager_model()(dense, tokens)
        assert torch.equal(hot.eager_model()(dense, tokens), want)
        assert torch.equal(hot.program().module()(dense, tokens), want)
    sess = ort.InferenceSession(str(hot.onnx_path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"dense": dense.numpy(), "tokens": tokens.numpy()})
    np_want = want.numpy()
    assert np.all(np.abs(got - np_want) <= TOLERANCE * np.maximum(1.0, np.abs(np_want)))
    for name in ("hot", "hot16", "hash"):
        report = verify_bundle(load_bundle(hot_bundles[name]))
        assert report.ok, (name, report.table())
        assert report.index_checks and all("ONNX function" in c["implementations"]
                                           for c in report.index_checks)
    report = verify_bundle(hot, dense.numpy(), tokens.numpy())
    assert report.ok, report.table()


def test_hash_bundles_and_format_1_still_serve(native: None, lma_checkpoint: Path,
                                               hot_bundles: dict[str, Path],
                                               tmp_path: Path) -> None:
    """A bundle without the serve option (every bundle written before the hot form) is the hash
    form; format 1 writes the hash form and refuses the hot one."""
    import json
    import shutil

    from model_export.bundle import export_bundle, load_bundle

    src = hot_bundles["hash"]
    m = json.loads((src / "manifest.json").read_text())
    assert m["embedding"]["serving"] == "hash"
    del m["embedding"]["serving"]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    (old / "manifest.json").write_text(json.dumps(m))
    (old / ".lma-verified.json").unlink(missing_ok=True)
    b = load_bundle(old)
    assert b.lma_serving == "hash" and b.eager_model().embedding.serve == "hash"
    with pytest.raises(ValueError, match="needs bundle format 2"):
        export_bundle(lma_checkpoint, tmp_path / "f1", bundle_format=1, lma_serving="hot")
    f1 = load_bundle(export_bundle(lma_checkpoint, tmp_path / "f1", bundle_format=1,
                                   sample_rows=64))
    assert f1.lma_serving == "hash" and "embedding_state.npz" in f1.manifest["files"]


def test_cli_lma_serving_option(native: None, lma_checkpoint: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from model_export import cli
    from model_export.bundle import load_bundle

    assert cli.main(["export", str(lma_checkpoint), "--out", str(tmp_path / "b"),
                     "--lma-serving", "hash", "--sample-rows", "32"]) == 0
    assert load_bundle(tmp_path / "b").lma_serving == "hash"
    assert cli.main(["verify", str(tmp_path / "b")]) == 0
    assert "result: OK" in capsys.readouterr().out


def test_auto_serving_form_follows_the_bytes(native: None, lma_checkpoint: Path,
                                             tmp_path: Path) -> None:
    """--lma-serving auto (the default): hot where the hot rows are a small share of the memory
    (large vocabularies), hash where they would outgrow it (this small model signs most of its
    vocabulary)."""
    from lma.embeddings import EmbeddingSpec
    from lma.embeddings.lma import LMAEmbedding
    from lma.signatures import SignatureTable
    from model_export.bundle import (
        HOT_AUTO_MAX_SHARE,
        choose_lma_serving,
        export_bundle,
        load_bundle,
    )

    tokens = np.arange(1, 1001, dtype=np.int64) * 7919
    table = SignatureTable(tokens, tokens * 31 + 5, {})
    large = LMAEmbedding(EmbeddingSpec("lma", 16, 1 << 20), table)  # 4 MB of memory, 64 kB hot
    small = LMAEmbedding(EmbeddingSpec("lma", 16, 4096), table)  # 16 kB of memory
    assert choose_lma_serving(large)[0] == "hot" and choose_lma_serving(small)[0] == "hash"
    form, why = choose_lma_serving(small)
    assert "1000 signed tokens" in why and f"{HOT_AUTO_MAX_SHARE:.0%}" in why
    b = load_bundle(export_bundle(lma_checkpoint, tmp_path / "auto", sample_rows=32))
    emb = b.eager_model().embedding
    assert emb.n_signed * 16 > HOT_AUTO_MAX_SHARE * emb.memory.numel()
    assert b.lma_serving == "hash" and b.manifest["embedding"]["serving_requested"] == "auto"
