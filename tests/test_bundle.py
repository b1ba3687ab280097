"""The bundle reader (lma.bundle) and the Predictor (lma.predictor): the serving-side contract."""

from __future__ import annotations

import json
import logging
import os
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
                                  version="7", sample_rows=64, torch_program=kind == "lma")
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
    for f in d.iterdir():
        if f.name not in ("manifest.json", "feature_map.json"):
            f.unlink()  # weights, vocabulary, sample: the schema must not need them
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
    # (in the hot serving form its precomputed rows are embedding bytes too)
    hot = emb.hot.numel() if emb.serve == "hot" else 0
    assert lc["embedding"] == 4 * (emb.memory.numel() + hot)
    assert lc["key_lookup"] >= 16 * emb.n_signed > 0
    # Format 1 manifests without "components" still answer, from the parameter breakdown.
    m = json.loads(json.dumps(full.manifest))
    del m["components"]
    old = Bundle(full.path, m).component_bytes()
    assert old["embedding"] == comp["embedding"] and old["mlp"] == comp["mlp"]
    assert old["key_lookup"] == model.embedding.state_bytes()


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


# ---------------------------------------------------------------- checksums and the marker


def _fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lma-verified.json").unlink(missing_ok=True)
    return dst


def test_export_hashes_once_and_the_first_load_trusts_it(bundles: dict[str, Path]) -> None:
    b = load_bundle(bundles["lma"])
    assert b.verification["verified"] == []
    assert sorted(b.verification["trusted"]) == sorted(b.manifest["files"])


def test_marker_written_then_trusted(bundles: dict[str, Path], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    d = _fresh_copy(bundles["full"], tmp_path / "b")
    files = sorted(json.loads((d / "manifest.json").read_text())["files"])
    with caplog.at_level(logging.INFO, logger="lma.bundle"):
        first = load_bundle(d)
    assert sorted(first.verification["verified"]) == files and first.verification["trusted"] == []
    assert (d / ".lma-verified.json").is_file()
    assert "verified sha256 of" in caplog.text and "model.onnx" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lma.bundle"):
        second = load_bundle(d)
    assert second.verification["verified"] == [] and sorted(second.verification["trusted"]) == files
    assert "trusted sha256 of" in caplog.text and "unchanged since they were verified" in caplog.text
    everything = load_bundle(d, trust_marker=False, workers=3)
    assert sorted(everything.verification["verified"]) == files


def test_marker_invalidated_when_a_file_changes(bundles: dict[str, Path], tmp_path: Path) -> None:
    d = _fresh_copy(bundles["lma"], tmp_path / "b")
    load_bundle(d)
    f = d / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, new mtime
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx.*sha256.*changed after export"):
        load_bundle(d)
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert "model.onnx" in load_bundle(d).verification["verified"]
    # A file replaced (new inode) by identical bytes with the old mtime is hashed, not trusted.
    st = f.stat()
    tmp = d / "copy.tmp"
    shutil.copyfile(f, tmp)
    os.replace(tmp, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_bundle(d).verification["verified"] == ["model.onnx"]
    # Different content at the same size, mtime and inode defeats the marker (as it would
    # defeat make or git's index); trust_marker=False is the full check.
    data[len(data) // 2] ^= 0x01
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_bundle(d).verification["verified"] == []
    with pytest.raises(BundleError, match="changed after export"):
        load_bundle(d, trust_marker=False)


def test_marker_of_another_manifest_is_ignored(bundles: dict[str, Path], tmp_path: Path) -> None:
    d = _fresh_copy(bundles["full"], tmp_path / "b")
    load_bundle(d)
    m = json.loads((d / "manifest.json").read_text())
    m["model"]["version"] = "8"
    (d / "manifest.json").write_text(json.dumps(m))
    assert sorted(load_bundle(d).verification["verified"]) == sorted(m["files"])


def test_read_only_bundle_keeps_its_marker_in_the_cache_dir(
        bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lma.bundle as reader

    d = _fresh_copy(bundles["full"], tmp_path / "b")
    monkeypatch.setenv("LMA_CACHE_DIR", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(reader.os, "access", lambda p, mode: False if Path(p) == d.resolve()
                        else real_access(p, mode))
    first = load_bundle(d)
    assert first.verification["verified"]
    assert Path(first.verification["marker"]).parent == tmp_path / "cache" / "verified"
    assert not (d / ".lma-verified.json").exists()
    assert load_bundle(d).verification["verified"] == []


def test_predictor_open_hashes_each_file_at_most_once(
        bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lma.bundle as reader

    d = _fresh_copy(bundles["lma"], tmp_path / "b")
    calls: list[str] = []
    real = reader.sha256_file

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        calls.append(Path(path).name)
        return real(path, chunk)

    monkeypatch.setattr(reader, "sha256_file", counting)
    Predictor.open(d, "onnx").warmup()
    data_calls = [c for c in calls if c != "manifest.json"]
    assert sorted(data_calls) == sorted(json.loads((d / "manifest.json").read_text())["files"])
    calls.clear()
    Predictor.open(d, "onnx")
    assert [c for c in calls if c != "manifest.json"] == []


def test_unverified_open_says_so(bundles: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lma.bundle"):
        b = load_bundle(bundles["full"], verify_checksums=False)
    assert "NOT verified" in caplog.text and b.verification["skipped"]


# ---------------------------------------------------------------- lma predict


def test_predict_skip_writes_the_input_line_of_each_row(
        bundles: dict[str, Path], tmp_path: Path, shared_data: Path) -> None:
    from model_export import cli

    lines = (shared_data / "criteo" / "train_10k.tsv").read_text().splitlines()[:30]
    bad = list(lines)
    cols = bad[4].split("\t")
    cols[1] = "not-a-number"  # I1 of input line 5
    bad[4] = "\t".join(cols)
    bad[11] = "too\tfew\tcolumns"  # line 12
    (tmp_path / "bad.tsv").write_text("\n".join(bad) + "\n")
    good = [ln for i, ln in enumerate(lines) if i not in (4, 11)]
    (tmp_path / "good.tsv").write_text("\n".join(good) + "\n")
    out = tmp_path / "skip.txt"
    assert cli.main(["predict", str(bundles["lma"]), "--data", f"criteo:{tmp_path / 'bad.tsv'}",
                     "--on-error", "skip", "--out", str(out)]) == 0
    text = out.read_text().splitlines()
    assert text[0] == "# line\tprobability"
    ids = [int(t.split("\t")[0]) for t in text[1:]]
    assert ids == [i for i in range(1, 31) if i not in (5, 12)]
    got = np.array([float(t.split("\t")[1]) for t in text[1:]])
    plain = tmp_path / "plain.txt"
    assert cli.main(["predict", str(bundles["lma"]), "--data", f"criteo:{tmp_path / 'good.tsv'}",
                     "--out", str(plain)]) == 0
    want = np.loadtxt(plain)
    assert want.shape == (28,)
    np.testing.assert_allclose(got, want, atol=1e-7)
    # The same rows through Predictor directly: one prediction path.
    d = open_source(f"criteo:{tmp_path / 'good.tsv'}").read_all()
    np.testing.assert_allclose(Predictor.open(bundles["lma"]).predict(d.dense, d.tokens), want,
                               atol=1e-7)
    # Without skip, no ids unless asked; synthetic rows are numbered by row.
    ids_out = tmp_path / "ids.txt"
    assert cli.main(["predict", str(bundles["lma"]), "--data", "synth:7:2", "--ids", "yes",
                     "--out", str(ids_out)]) == 0
    rows = ids_out.read_text().splitlines()
    assert rows[0] == "# row\tprobability" and [r.split("\t")[0] for r in rows[1:]] == [
        str(i) for i in range(1, 8)]
