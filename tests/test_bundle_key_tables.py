"""Stored key tables: checkpoints and bundles hold the built token -> row / signature tables,
loads take them instead of building them again, and checkpoints and format 2 bundles written
before (sorted vocabulary, no table in the state dict) still load, building the table once."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lma import hashspec, tensorfile
from lma.bundle import _vocabulary_sizes, load_bundle, sha256_file, write_marker
from lma.checkpoint import load_checkpoint, rebuild_model, save_checkpoint, upgrade_checkpoint
from lma.data import open_source
from lma.features import FeatureMap
from lma.predictor import Predictor
from lma.train import TrainConfig, train_model
from model_export.bundle import export_bundle
from model_export.verify import verify_bundle

TABLE = ("table", "header")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Full tables with a first-order table of a higher threshold (two vocabulary sizes), and
    LMA 4x with a full first-order table."""
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for kind in ("full", "lma"):
        out[kind] = root / kind
        train_model(TrainConfig(data="synth:1500:3", embedding=kind, epochs=1, batch_size=256,
                                compression=1.0 if kind == "full" else 4.0, first_order=True,
                                first_order_min_count=2 if kind == "full" else 1,
                                warmup_epochs=1, progress=False, threads=1, out=str(out[kind])))
    return out


@pytest.fixture(scope="module")
def bundles(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("b")
    return {k: export_bundle(ck, root / k, sample_rows=64) for k, ck in checkpoints.items()}


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    d = open_source("synth:300:9").read_all()
    return torch.from_numpy(d.dense), torch.from_numpy(d.tokens)


def _logits(model: torch.nn.Module) -> np.ndarray:
    dense, tokens = _rows()
    with torch.no_grad():
        return model(dense, tokens).numpy()


def _no_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a key table was built although one is stored")

    monkeypatch.setattr(hashspec, "build_key_table", refuse)


def _old_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` as the writer before stored key tables wrote it: full tables store their sorted
    vocabulary (``<table>.vocab``) and no table, LMA no table."""
    shutil.copytree(src, dst)
    payload = torch.load(dst / "checkpoint.pt", weights_only=True)
    sd = payload["state_dict"]
    fmap = FeatureMap.load(dst)
    mc = payload["model_config"]
    thresholds = {"embedding": payload["embedding_config"]}
    if mc.get("first_order"):
        thresholds["first_order"] = mc["first_order"]
    for t, cfg in thresholds.items():
        for n in TABLE:
            sd.pop(f"{t}.key_table.{n}", None)
        if cfg["kind"] == "full":
            sd[f"{t}.vocab"] = torch.from_numpy(np.sort(np.concatenate(
                fmap.vocab(int(cfg.get("min_count", 1))))))
    torch.save(payload, dst / "checkpoint.pt")
    return dst


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_checkpoints_store_key_tables_and_loads_take_them(
        checkpoints: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = torch.load(checkpoints[kind] / "checkpoint.pt", weights_only=True, mmap=True)
    sd = payload["state_dict"]
    full = [t for t in ("embedding", "first_order")
            if (payload["embedding_config"] if t == "embedding"
                else payload["model_config"]["first_order"])["kind"] == "full"]
    stored = [t for t in ("embedding", "first_order") if f"{t}.key_table.table" in sd]
    assert set(full) <= set(stored) and (kind != "lma" or "embedding" in stored)
    # One form of the vocabulary: the table, not also the sorted tokens.
    assert not any(k.endswith(".vocab") for k in sd)
    for t in stored:
        assert sd[f"{t}.key_table.header"].tolist()[0] == hashspec.KEY_TABLE_VERSION
    _no_builds(monkeypatch)
    ck = load_checkpoint(checkpoints[kind])
    for t in stored:
        kt = getattr(ck.model, t).key_table
        assert not kt.is_placeholder and kt.n_keys > 0
    # The loaded tensors themselves (memory-mapped), not copies.
    model = rebuild_model(payload["model_config"], payload["embedding_config"], ck.feature_map,
                          checkpoints[kind] / "embedding_state.npz", weights=sd)
    assert model.embedding.key_table.table.data_ptr() == sd["embedding.key_table.table"].data_ptr()
    np.testing.assert_array_equal(_logits(model), _logits(ck.model))


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_checkpoints_written_before_still_load_and_upgrade(
        checkpoints: dict[str, Path], kind: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    want = _logits(load_checkpoint(checkpoints[kind]).model)
    old = _old_checkpoint(checkpoints[kind], tmp_path / "old")
    with caplog.at_level(logging.INFO, logger="lma.ops.key_lookup"):
        ck = load_checkpoint(old)
    assert "no key table stored; using a table built now" in caplog.text
    assert "lean load" not in caplog.text
    np.testing.assert_array_equal(_logits(ck.model), want)
    new_sd = torch.load(checkpoints[kind] / "checkpoint.pt", weights_only=True)["state_dict"]
    for k, v in ck.model.state_dict().items():  # the very tables the trainer built
        assert torch.equal(v, new_sd[k]), k
    up = upgrade_checkpoint(old, tmp_path / "up")
    payload = torch.load(up / "checkpoint.pt", weights_only=True)
    assert set(payload["state_dict"]) == set(new_sd)
    assert "embedding.key_table.table" in payload["upgraded"]["stored"]
    assert ("embedding.vocab" in payload["upgraded"]["dropped"]) == (kind == "full")
    assert payload["versions"] == torch.load(old / "checkpoint.pt", weights_only=True)["versions"]
    # In place too; the upgraded checkpoint loads without building anything.
    assert upgrade_checkpoint(old) == old
    _no_builds(monkeypatch)
    for d in (up, old):
        np.testing.assert_array_equal(_logits(load_checkpoint(d).model), want)


def test_a_key_table_of_another_layout_is_never_used(
        checkpoints: dict[str, Path], bundles: dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    want = _logits(load_checkpoint(checkpoints["full"]).model)
    d = tmp_path / "ck"
    shutil.copytree(checkpoints["full"], d)
    payload = torch.load(d / "checkpoint.pt", weights_only=True)
    payload["state_dict"]["embedding.key_table.header"][0] = 99
    torch.save(payload, d / "checkpoint.pt")
    # A checkpoint has its feature map: the model is built from it, with a warning.
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(d)
    assert "layout v99" in caplog.text and "lean load" in caplog.text
    np.testing.assert_array_equal(_logits(ck.model), want)
    # A bundle has only the table: refused, naming the reason.
    b = load_bundle(bundles["full"])
    arrays = dict(b.weights())
    arrays["embedding.key_table.header"] = np.array([99, 0, 1], np.int64)
    fmap = _vocabulary_sizes(b, b.feature_map(), arrays)
    with pytest.raises(ValueError, match=r"layout v99.*cannot be built without it.*size only"):
        rebuild_model(b.manifest["model"]["config"], b.manifest["embedding"]["config"], fmap,
                      None, weights={k: torch.from_numpy(v) for k, v in arrays.items()})
    nb = arrays["embedding.key_table.table"].shape[0]
    bad = dict(arrays, **{"embedding.key_table.header": np.array(
        [hashspec.KEY_TABLE_VERSION, nb + 1, 1], np.int64)})
    with pytest.raises(ValueError, match="shapes do not fit together"):
        rebuild_model(b.manifest["model"]["config"], b.manifest["embedding"]["config"], fmap,
                      None, weights={k: torch.from_numpy(v) for k, v in bad.items()})


def test_bundles_store_the_vocabulary_once_and_open_without_building(
        bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    dense, tokens = (t.numpy() for t in _rows())
    for kind, d in bundles.items():
        b = load_bundle(d)
        header, _ = tensorfile.header(d / "weights.safetensors")
        names = set(header) - {"__metadata__"}
        assert not any(n.endswith(".vocab") for n in names), kind
        assert not any("key_table" in n and n.startswith("onnx::") for n in names), kind
        # The graph reads the very tensors the torch engines load (LMA, exported in its hot
        # serving form: the token -> hot row table).
        t = "embedding.hot_lookup.table" if b.lma_serving == "hot" else "embedding.key_table.table"
        assert t in b.manifest["weights"]["onnx_shares"]
        assert b.component_bytes()["key_lookup"] >= header[t]["data_offsets"][1] - header[t][
            "data_offsets"][0]
    _no_builds(monkeypatch)
    for d in bundles.values():
        p = Predictor.open(d, "eager")
        p.warmup(rows=64)
        np.testing.assert_allclose(p.logits(dense, tokens),
                                   Predictor.open(d, "onnx").logits(dense, tokens),
                                   rtol=1e-5, atol=1e-5)
        assert verify_bundle(load_bundle(d)).ok


def _as_written_before(src: Path, checkpoint: Path, dst: Path) -> Path:
    """``src`` as the format 2 writer before stored key tables wrote it: weights.safetensors
    holds each full table's sorted vocabulary (``<t>.vocab``) in the state dict, the key tables
    only as ONNX initializers without a state-dict twin (``onnx::<t>.key_table.table``)."""
    shutil.copytree(src, dst)
    (dst / ".lma-verified.json").unlink(missing_ok=True)
    m = json.loads((dst / "manifest.json").read_text())
    arrays = {k: np.array(v) for k, v in tensorfile.read(dst / "weights.safetensors").items()}
    header, start = tensorfile.header(dst / "weights.safetensors")
    at = {start + h["data_offsets"][0]: k for k, h in header.items() if k != "__metadata__"}
    onnx_names: dict[str, str] = {}
    for k in list(arrays):
        if ".key_table." not in k:
            continue
        t, n = k.split(".key_table.")
        if n == "table":
            onnx_names[k] = f"onnx::{k}"
            arrays[onnx_names[k]] = arrays.pop(k)
        else:
            onnx_names[k] = ""  # back inside model.onnx
            if n == "header":
                arrays.pop(k)
    fmap = FeatureMap.load(checkpoint)
    old_vocab = []
    for t, cfg in (("embedding", m["embedding"]["config"]),
                   ("first_order", m["model"]["config"].get("first_order") or {})):
        if cfg.get("kind") == "full":
            arrays[f"{t}.vocab"] = np.sort(np.concatenate(fmap.vocab(int(cfg["min_count"]))))
            old_vocab.append(f"{t}.vocab")
    coefs = {k: arrays.pop(k) for k in [k for k, v in onnx_names.items() if v == ""] if k in arrays}
    refs = tensorfile.write(dst / "weights.safetensors", arrays, {"format": "pt"})
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e for e in init.external_data}
        stored = at[int(ext["offset"].value)]
        name = onnx_names.get(stored, stored)
        if name == "":
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
            init.raw_data = coefs[stored].tobytes()
            continue
        offset, length = refs[name]
        ext["offset"].value, ext["length"].value = str(offset), str(length)
    onnx.save_model(model, str(dst / "model.onnx"))
    sd = [k for k in m["weights"]["state_dict"] if ".key_table." not in k]
    m["weights"]["state_dict"] = sorted(sd + old_vocab)
    m["weights"]["onnx_only"] = sorted(v for v in onnx_names.values() if v)
    for f in ("weights.safetensors", "model.onnx"):
        m["files"][f] = {"sha256": sha256_file(dst / f), "bytes": (dst / f).stat().st_size}
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    write_marker(dst, {f: i["sha256"] for f, i in m["files"].items()})
    return dst


def test_format_2_bundles_written_before_are_still_read(
        bundles: dict[str, Path], checkpoints: dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    dense, tokens = (t.numpy() for t in _rows())
    for kind, d in bundles.items():
        if kind == "lma":  # every LMA bundle written before stored key tables is the hash form
            d = export_bundle(checkpoints[kind], tmp_path / "lma_hash", sample_rows=64,
                              lma_serving="hash")
        old = _as_written_before(d, checkpoints[kind], tmp_path / kind)
        names = set(tensorfile.header(old / "weights.safetensors")[0])
        assert "onnx::embedding.key_table.table" in names
        assert ("embedding.vocab" in names) == (kind == "full")
        want = Predictor.open(d, "onnx").logits(dense, tokens)
        np.testing.assert_allclose(Predictor.open(old, "onnx").logits(dense, tokens), want,
                                   rtol=1e-6, atol=1e-6)
        with caplog.at_level(logging.INFO, logger="lma.ops.key_lookup"):
            eager = Predictor.open(old, "eager")
        assert "no key table stored; using a table built now" in caplog.text
        np.testing.assert_allclose(eager.logits(dense, tokens), want, rtol=1e-5, atol=1e-5)
        report = verify_bundle(load_bundle(old))
        assert report.ok, report.table()


def test_saving_over_a_loaded_checkpoint_keeps_the_loaded_model(
        checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Loads map the checkpoint's files; a save into the same folder renames new files over
    them instead of rewriting the mapped ones."""
    d = tmp_path / "ck"
    shutil.copytree(checkpoints["full"], d)
    ck = load_checkpoint(d)
    want = _logits(ck.model)
    save_checkpoint(d, ck.model, ck.feature_map, ck.metrics)
    np.testing.assert_array_equal(_logits(ck.model), want)
    np.testing.assert_array_equal(_logits(load_checkpoint(d).model), want)
    assert not [p for p in d.iterdir() if p.name.startswith(".lma-save-")]
    fm, mm = FeatureMap.load(d), FeatureMap.load(d, mmap=True)
    for a, b in zip(fm.tokens + fm.counts, mm.tokens + mm.counts, strict=True):
        np.testing.assert_array_equal(a, b)
