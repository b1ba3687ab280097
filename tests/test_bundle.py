"""The bundle reader (lma.bundle) and the Predictor (lma.predictor): the serving-side contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lma.bundle import Bundle, BundleError, load_bundle
from lma.data import open_source
from lma.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lma.train import TrainConfig, train_model
    from model_export.bundle import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for kind in ("lma", "full"):
        train_model(TrainConfig(data="synth:1500:3", embedding=kind,
                                compression=1.0 if kind == "full" else 4.0, epochs=1,
                                batch_size=256, progress=False, threads=1,
                                out=str(root / f"ck_{kind}")))
        out[kind] = export_bundle(root / f"ck_{kind}", root / f"b_{kind}", name=f"m_{kind}",
                                  version="7", sample_rows=64)
    return out


def _rows(n: int = 300, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    d = open_source(f"synth:{n}:{seed}").read_all()
    return d.dense, d.tokens


def test_reader_imports_no_torch_onnx_or_onnxruntime() -> None:
    code = ("import sys\n"
            "import lma.bundle, lma.predictor\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'model_export')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_op_names_agree_with_the_writer() -> None:
    from lma import bundle as reader
    from model_export import onnx_spec

    assert (reader.CUSTOM_OP_DOMAIN, reader.CUSTOM_OP_TYPE, reader.CUSTOM_OP_VERSION) == (
        onnx_spec.DOMAIN, onnx_spec.OP_TYPE, onnx_spec.OP_VERSION)


def test_model_export_reexports_the_reader() -> None:
    import model_export.bundle as mb
    import model_export.predict as mp

    assert mb.load_bundle is load_bundle and mb.Bundle is Bundle and mb.BundleError is BundleError
    assert mp.Predictor is Predictor


def test_bundle_properties(bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["lma"])
    assert (b.name, b.version, b.kind) == ("m_lma", "7", "lma")
    assert b.onnx_path == bundles["lma"] / "model.onnx" and b.onnx_path.is_file()
    assert b.program_path is not None and b.program_path.is_file()
    assert b.file("sample.npz").is_file()
    assert b.schema.to_dict() == b.feature_map().schema.to_dict()
    assert (b.n_dense, b.n_token_slots) == (13, 26)
    s = b.sample()
    assert s["dense"].shape == (64, 13) and s["tokens"].shape == (64, 26)
    assert s["logits"].shape == (64,)


def test_schema_reads_only_the_small_json(bundles: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(bundles["full"], d)
    b = load_bundle(d)
    for f in d.glob("feature_map.npz"):
        f.unlink()  # the vocabulary counts: the schema must not need them
    assert b.schema.categorical_names[:2] == ["C1", "C2"]
    assert b.schema is b.schema  # cached


def test_component_bytes(bundles: dict[str, Path]) -> None:
    full = load_bundle(bundles["full"])
    comp = full.component_bytes()
    model = full.eager_model()
    assert comp["embedding"] == 4 * model.embedding.table.weight.numel()
    # The sorted vocabulary (8 B per token) and the slot -> field map.
    assert comp["key_lookup"] >= 8 * model.embedding.n_vocab
    mlp = sum(p.numel() * 4 for n, p in model.named_parameters()
              if n.split(".")[0] in ("bottom", "top"))
    assert comp["mlp"] == mlp
    assert comp["total"] == sum(v for k, v in comp.items() if k != "total")
    lma_b = load_bundle(bundles["lma"])
    lc = lma_b.component_bytes()
    emb = lma_b.eager_model().embedding
    assert lc["embedding"] == 4 * emb.memory.numel()
    assert lc["key_lookup"] >= 16 * emb.n_signed > 0
    # Format 1 manifests without "components" still answer, from the parameter breakdown.
    m = json.loads(json.dumps(full.manifest))
    del m["components"]
    old = Bundle(full.path, m).component_bytes()
    assert old["embedding"] == comp["embedding"] and old["mlp"] == comp["mlp"]
    assert old["key_lookup"] == 8 * model.embedding.n_vocab


@pytest.mark.parametrize("engine", ["onnx", "program", "eager"])
def test_predictor_engines_agree_and_warm_up(bundles: dict[str, Path], engine: str) -> None:
    dense, tokens = _rows()
    ref = Predictor.open(bundles["lma"], "eager").logits(dense, tokens)
    p = Predictor.open(bundles["lma"], engine, intra_op_threads=1)
    np.testing.assert_allclose(p.logits(dense, tokens), ref, rtol=1e-5, atol=1e-5)
    secs = p.warmup(rows=100)
    assert secs > 0 and p.warmup_seconds == secs
    assert p.open_seconds > 0
    want = ["CPUExecutionProvider"] if engine == "onnx" else ["torch:cpu"]
    assert p.providers_in_use() == want


def test_session_options_and_providers_reach_the_session(bundles: dict[str, Path]) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    p = Predictor.open(bundles["full"], "onnx", providers=["CPUExecutionProvider"],
                       session_options=so, intra_op_threads=2)
    assert p.session.get_session_options().intra_op_num_threads == 2
    assert (p.session.get_session_options().graph_optimization_level
            == ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    p.warmup()


def _score_concurrently(p: Predictor, parts: list[tuple[np.ndarray, np.ndarray]]
                        ) -> tuple[dict[int, np.ndarray], list[BaseException]]:
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                got[i] = p.logits(*parts[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got, errors


def test_predictor_is_thread_safe(bundles: dict[str, Path]) -> None:
    dense, tokens = _rows(400, 5)
    for engine in ("onnx", "program"):
        p = Predictor.open(bundles["lma"], engine)
        want = p.logits(dense, tokens)
        got, errors = _score_concurrently(p, [(dense[i::8], tokens[i::8]) for i in range(8)])
        assert not errors
        for i in range(8):
            np.testing.assert_allclose(got[i], want[i::8], rtol=1e-6, atol=1e-6)


def test_warmup_catches_a_wrong_model(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A bundle whose saved sample logits disagree with what the engine computes (a model that
    changed under a consistent manifest) fails its warm-up instead of serving."""
    from lma.bundle import sha256_file

    d = tmp_path / "b"
    shutil.copytree(bundles["full"], d)
    s = dict(np.load(d / "sample.npz"))
    s["logits"] = s["logits"] + 0.5
    np.savez(d / "sample.npz", **s)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["sample.npz"].update(sha256=sha256_file(d / "sample.npz"),
                                    bytes=(d / "sample.npz").stat().st_size)
    (d / "manifest.json").write_text(json.dumps(m))
    p = Predictor.open(d, "onnx")
    with pytest.raises(BundleError, match="away from those saved at export"):
        p.warmup()
    assert p.warmup(check=False) > 0


def test_bad_rows_and_engine_are_refused(bundles: dict[str, Path]) -> None:
    p = Predictor.open(bundles["full"])
    dense, tokens = _rows(10)
    with pytest.raises(ValueError, match="expects 13 / 26"):
        p.logits(dense[:, :5], tokens)
    with pytest.raises(ValueError, match="2-D"):
        p.logits(dense[0], tokens[0])
    with pytest.raises(ValueError, match="engine must be one of"):
        Predictor.open(bundles["full"], "tensorrt")


def test_open_accepts_a_loaded_bundle(bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["lma"])
    p = Predictor.open(b)
    assert p.bundle is b
