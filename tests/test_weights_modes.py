"""Weights in private memory or memory-mapped (``weights="private" | "mmap"``): the onnx and eager
engines (Predictor and the service backends, one implementation) give identical outputs either
way; private weights are read by us and handed to onnxruntime, which then maps nothing; a
damaged weights file fails clearly in both modes; the service takes ``LMA_SERVE_WEIGHTS``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import requests

from lma.bundle import DEFAULT_WEIGHTS, WEIGHTS_FILE, BundleError, load_bundle
from lma.predictor import Predictor, onnx_session
from lma.train import TrainConfig, train_model
from model_export.bundle import export_bundle
from tests.service_fixtures import Server


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for kind, comp in (("full", 1.0), ("lma", 4.0)):
        train_model(TrainConfig(data="synth:2000:1", embedding=kind, compression=comp, epochs=1,
                                batch_size=256, progress=False, threads=1,
                                out=str(root / f"ck_{kind}")))
        out[kind] = export_bundle(root / f"ck_{kind}", root / f"b_{kind}", name=kind,
                                  sample_rows=64)
    return out


def _rows() -> tuple[np.ndarray, np.ndarray]:
    from lma.data import open_source

    data = open_source("synth:400:9").read_all()
    tokens = data.tokens.copy()
    tokens[:10, :4] = np.arange(1, 41).reshape(10, 4) * 7919  # unseen tokens
    return data.dense, tokens


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (onnxruntime maps external data it loads itself)."""
    target = str(path.resolve())
    return any(line.endswith(target) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_private_and_mapped_weights_give_identical_outputs(bundles, tmp_path, kind):
    # A copy of its own, so that no other session of this test process maps its weights.
    b = load_bundle(shutil.copytree(bundles[kind], tmp_path / "b"))
    d, t = _rows()
    got = {}
    for engine in ("onnx", "eager"):
        for mode in ("private", "mmap"):
            p = Predictor.open(b, engine=engine, weights=mode)
            assert p.weights == mode
            p.warmup(64)
            got[engine, mode] = p.logits(d, t)
            if engine == "onnx" and mode == "private":
                # onnxruntime took our arrays and read (mapped) nothing of the file itself.
                assert not _mapped(b.file(WEIGHTS_FILE))
                assert p._owned["private_bytes"] > 0.9 * b.file(WEIGHTS_FILE).stat().st_size
            if engine == "onnx" and mode == "mmap":
                assert _mapped(b.file(WEIGHTS_FILE))
            del p
    for engine in ("onnx", "eager"):
        np.testing.assert_array_equal(got[engine, "private"], got[engine, "mmap"])
    np.testing.assert_allclose(got["onnx", "private"], got["eager", "private"], rtol=1e-5,
                               atol=1e-5)


def test_private_eager_weights_are_not_mapped(bundles):
    b = load_bundle(bundles["full"])
    private = b.eager_model("private")
    mapped = b.eager_model("mmap")
    assert private is not mapped and b.eager_model("private") is private  # cached per mode
    w = private.embedding.table.weight
    assert w.untyped_storage().nbytes() == w.numel() * 4
    assert np.array_equal(w.detach().numpy(), mapped.embedding.table.weight.detach().numpy())


def test_unknown_mode_is_refused(bundles):
    with pytest.raises(ValueError, match="weights must be one of private, mmap"):
        Predictor.open(bundles["lma"], weights="huge")


@pytest.mark.parametrize("mode", ["private", "mmap"])
def test_damaged_or_missing_weights_fail_clearly(bundles, tmp_path, mode):
    b = shutil.copytree(bundles["full"], tmp_path / "b")
    w = b / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(BundleError, match=WEIGHTS_FILE):
        load_bundle(b)  # the checksums catch it first
    for engine in ("onnx", "eager"):
        with pytest.raises(BundleError, match=WEIGHTS_FILE):
            Predictor.open(b, engine=engine, weights=mode, verify_checksums=False)
    w.unlink()
    with pytest.raises(BundleError, match=f"{WEIGHTS_FILE}: listed in manifest.json but missing"):
        load_bundle(b)
    for engine in ("onnx", "eager"):
        with pytest.raises(BundleError, match=WEIGHTS_FILE):
            Predictor.open(b, engine=engine, weights=mode, verify_checksums=False)


def test_cuda_providers_leave_the_weights_to_onnxruntime(bundles):
    # On CUDA the weights are copied to the device: no private host copy is made. (This
    # onnxruntime may have no CUDA provider; it then warns and runs on the CPU provider.)
    b = load_bundle(bundles["lma"])
    sess, owned = onnx_session(b, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                               weights="private")
    assert owned["mode"] == "onnxruntime" and "arrays" not in owned
    s = b.sample()
    out = sess.run(None, {"dense": s["dense"], "tokens": s["tokens"]})[0]
    np.testing.assert_allclose(out, s["logits"], rtol=1e-5, atol=1e-5)


def test_service_takes_the_weights_setting(bundles, tmp_path):
    from service.settings import ServeSettings

    assert ServeSettings(models=["x"]).weights == DEFAULT_WEIGHTS == "mmap"
    with pytest.raises(ValueError, match="weights"):
        ServeSettings(models=["x"], weights="shared")
    d, t = _rows()
    answers, maps = {}, {}
    for mode in ("private", "mmap"):
        b = shutil.copytree(bundles["lma"], tmp_path / mode)
        s = Server(str(b), tmp_path / f"{mode}.log", weights=mode).wait_ready()
        try:
            info = requests.get(f"{s.url}/v1/models/lma", timeout=10).json()
            body = {"id": "r", "inputs": [
                {"name": "dense", "shape": list(d[:50].shape), "datatype": "FP32",
                 "data": d[:50].reshape(-1).tolist()},
                {"name": "tokens", "shape": list(t[:50].shape), "datatype": "INT64",
                 "data": t[:50].reshape(-1).tolist()}]}
            r = requests.post(f"{s.url}/v2/models/lma/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            answers[mode] = r.json()["outputs"][0]["data"]
            target = str((b / WEIGHTS_FILE).resolve())
            maps[mode] = any(line.rstrip("\n").endswith(target)
                             for line in Path(f"/proc/{s.proc.pid}/maps").read_text().splitlines())
        finally:
            s.stop()
        assert info["weights"] == mode, info
    assert answers["private"] == answers["mmap"]
    assert maps == {"private": False, "mmap": True}
