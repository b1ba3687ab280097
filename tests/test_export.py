"""Bundles: train a tiny model per kind, export, verify the three engines, refuse tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lma.data import open_source
from lma.train import TrainConfig, train_model
from model_export import cli
from model_export.bundle import BundleError, export_bundle, load_bundle, sha256_file
from model_export.predict import Predictor
from model_export.verify import verify_bundle

KINDS = ["lma", "robez", "full", "hash", "qr"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out: dict[str, Path] = {}
    for kind in KINDS:
        options = {"z": 4} if kind == "robez" else {}
        cfg = TrainConfig(
            data="synth:2000:1",
            embedding=kind,
            compression=1.0 if kind == "full" else 4.0,
            epochs=1,
            batch_size=256,
            progress=False,
            threads=1,
            options=options,
            out=str(root / f"ck_{kind}"),
        )
        train_model(cfg)
        out[kind] = export_bundle(root / f"ck_{kind}", root / f"bundle_{kind}", sample_rows=128,
                                  torch_program=kind in ("full", "lma"))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_engines_agree(bundles: dict[str, Path], kind: str) -> None:
    b = load_bundle(bundles[kind])
    m = b.manifest
    assert m["embedding"]["kind"] == kind
    # Format 2: the weights once (weights.safetensors, which model.onnx points into), the
    # schema without training counts, per-token state only where there is some, the torch
    # program only when asked for, the per-field vocabulary only for QR.
    want = {"model.onnx", "weights.safetensors", "feature_map.json", "sample.npz"}
    want |= {"model.pt2"} if kind in ("full", "lma") else set()
    # (LMA: the signature table, unless exported in the hot serving form, which folds it into
    # its hot rows; tests/test_hot_gather.py covers both forms.)
    hot_form = kind == "lma" and b.lma_serving == "hot"
    want |= {"embedding_state.npz"} if kind == "lma" and not hot_form else set()
    want |= {"vocabulary.npz"} if kind == "qr" else set()
    assert {f for f in m["files"]} == want
    assert m["bundle_format"] == 2
    assert m["inputs"][0] == {"name": "dense", "dtype": "float32", "shape": ["batch", 13]}
    assert m["inputs"][1]["shape"] == ["batch", 26]
    assert m["onnx"]["ir_version"] <= 10
    assert m["parameters"]["embedding"]["count"] == m["metrics"]["embedding_params"]
    model = onnx.load(str(b.file("model.onnx")))
    onnx.checker.check_model(model)
    domains = {n.domain for n in model.graph.node}
    if kind in ("lma", "robez"):
        assert m["hash_spec_version"] == 1
        assert m["onnx"]["custom_op"]["domain"] == "ai.lma"
        op = "HotGather" if hot_form else "HashedGather"
        custom = [n for n in model.graph.node if n.op_type == op]
        assert len(custom) == 1 and custom[0].domain == "ai.lma"
        graph_ops = {n.op_type for n in model.graph.node if n.domain == "ai.lma"}
        assert m["onnx"]["custom_op"]["op_types"] == sorted(graph_ops) and op in graph_ops
        # lma resolves token -> signature (hot form: -> hot row) with a key table (one KeyLookup
        # node); a HotGather function calls the HashedGather function on the other tokens
        want = ({"HotGather", "HashedGather", "KeyLookup"} if hot_form
                else {"HashedGather", "KeyLookup"} if kind == "lma" else {"HashedGather"})
        assert {f.name for f in model.functions} == want
    elif kind in ("full", "qr"):  # token -> row by a key table
        assert domains <= {"", "ai.lma"} and [f.name for f in model.functions] == ["KeyLookup"]
        assert [n["op_type"] for n in m["onnx"]["custom_op"]["nodes"]] == ["KeyLookup"]
        assert m["onnx"]["custom_op"]["op_types"] == ["KeyLookup"]
    else:
        assert domains <= {""} and not model.functions
        assert m["onnx"]["custom_op"] is None

    report = verify_bundle(b)
    assert report.ok, report.table()
    engines = [ln["engine"] for ln in report.lines]
    assert any("onnxruntime" in e for e in engines)
    assert any("program" in e for e in engines) == (b.program_path is not None)
    if kind in ("lma", "robez"):
        assert len(report.index_checks) == 1
        check = report.index_checks[0]
        assert check["ok"] and "ONNX function" in check["implementations"]
        assert check["count"] == 128 * 26 * 16

    # Fresh rows (not the sample), including tokens never seen in training.
    data = open_source("synth:300:77").read_all()
    tokens = data.tokens.copy()
    tokens[:50, :5] = np.arange(1, 251).reshape(50, 5) * 7919
    assert verify_bundle(b, data.dense, tokens).ok


def test_lma_signature_lookup_in_graph(bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["lma"])
    emb = b.eager_model().embedding
    assert emb.n_signed > 0  # the tiny run does sign tokens, so the lookup is exercised
    assert b.lma_serving == emb.serve
    if emb.serve == "hot":
        assert emb.hot.shape == (emb.n_signed, 16) and emb.hot_lookup.n_keys == emb.n_signed
        assert "embedding_state.npz" not in b.manifest["files"]
    else:
        with np.load(b.file("embedding_state.npz")) as z:
            assert len(z["sig_tokens"]) == emb.n_signed


def test_cli_verify_and_predict(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["verify", str(bundles["lma"])]) == 0
    assert "result: OK" in capsys.readouterr().out
    assert cli.main(["verify", str(bundles["robez"]), "--data", "synth:64:9"]) == 0
    out = tmp_path / "p.txt"
    assert (
        cli.main(["predict", str(bundles["lma"]), "--data", "synth:500:4", "--out", str(out)]) == 0
    )
    probs = np.array([float(x) for x in out.read_text().split()])
    data = open_source("synth:500:4").read_all()
    model = load_bundle(bundles["lma"]).eager_model()
    with torch.no_grad():
        want = torch.sigmoid(
            model(torch.from_numpy(data.dense), torch.from_numpy(data.tokens))
        ).numpy()
    assert probs.shape == (500,)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    p = Predictor.open(bundles["full"], engine="program")
    np.testing.assert_allclose(p.predict(data.dense[:10], data.tokens[:10]).shape, (10,))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_edited_file_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(bundles["robez"], tmp_path / "b")
    f = d / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx.*sha256.*changed after export"):
        load_bundle(d)
    (d / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match=r"weights\.safetensors.*missing|model\.onnx"):
        load_bundle(d)
    assert cli.main(["verify", str(d)]) == 2  # refused with an error message, not a traceback


def test_wrong_versions_are_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(bundles["lma"], tmp_path / "b")
    mf = d / "manifest.json"
    original = json.loads(mf.read_text())
    m = json.loads(mf.read_text())
    m["hash_spec_version"] = 2
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json.*hash_spec_version 2"):
        load_bundle(d)
    m = dict(original, bundle_format=99)
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle_format 99"):
        load_bundle(d)
    m = json.loads(json.dumps(original))
    m["onnx"]["custom_op"]["nodes"][0]["spec_version"] = 3
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="spec_version 3"):
        load_bundle(d)
    mf.unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(d)


def test_consistent_but_wrong_model_fails_verify(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A bundle whose ONNX weights were changed and re-checksummed passes load but fails verify."""
    d = _copy(bundles["hash"], tmp_path / "b")
    f = d / "model.onnx"
    model = onnx.load(str(f))
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(big).copy()
    arr += np.float32(0.05)
    big.CopyFrom(numpy_helper.from_array(arr, big.name))
    onnx.save(model, str(f))
    mf = d / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"]["model.onnx"].update(sha256=sha256_file(f), bytes=f.stat().st_size)
    mf.write_text(json.dumps(m))
    b = load_bundle(d)
    report = verify_bundle(b)
    assert not report.ok
    assert "MISMATCH" in report.table()
    assert cli.main(["verify", str(d)]) == 1


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_first_order_model_exports_and_verifies(tmp_path: Path, kind: str) -> None:
    cfg = TrainConfig(data="synth:2000:1", embedding=kind, compression=1.0 if kind == "full" else 4.0,
                      epochs=1, warmup_epochs=1, first_order=True, batch_size=256,
                      progress=False, threads=1, out=str(tmp_path / "ck"))
    train_model(cfg)
    b = load_bundle(export_bundle(tmp_path / "ck", tmp_path / "bundle", sample_rows=64))
    assert b.manifest["model"]["config"]["first_order"]["kind"] == ("full" if kind == "full" else "hash")
    report = verify_bundle(b)
    assert report.ok, report.table()
    data = open_source("synth:200:5").read_all()
    tokens = data.tokens.copy()
    tokens[:20, :3] = np.arange(1, 61).reshape(20, 3) * 104729  # unseen tokens
    assert verify_bundle(b, data.dense, tokens).ok
    # The first-order term is trained and part of the exported graph: the ONNX logits match the
    # eager model's, which change when the term is zeroed.
    onnx_logits = Predictor.open(b.path, "onnx").logits(data.dense, tokens)
    eager = b.eager_model()
    d, t = torch.from_numpy(data.dense), torch.from_numpy(tokens)
    with torch.no_grad():
        full = eager(d, t).numpy()
        eager.first_order.table.weight.zero_()
        without = eager(d, t).numpy()
    np.testing.assert_allclose(onnx_logits, full, rtol=1e-4, atol=1e-4)
    assert np.abs(full - without).max() > 1e-3
