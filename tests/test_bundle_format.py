"""Bundle format 2 (each byte once, nothing unpickled on the serving path) and format 1 bundles
(made by the old writer path) still read; lean loads of checkpoints and bundles."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lma import hashspec, tensorfile
from lma.bundle import BundleError, load_bundle
from lma.checkpoint import load_checkpoint, rebuild_model
from lma.data import open_source
from lma.predictor import Predictor
from lma.train import TrainConfig, train_model
from model_export import cli
from model_export.bundle import export_bundle
from model_export.verify import verify_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ck")
    out = {}
    for kind in ("full", "lma"):
        out[kind] = root / kind
        train_model(TrainConfig(data="synth:1200:4", embedding=kind, epochs=1, batch_size=256,
                                compression=1.0 if kind == "full" else 4.0, first_order=True,
                                warmup_epochs=1, progress=False, threads=1, out=str(out[kind])))
    return out


@pytest.fixture(scope="module")
def v1(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format 1 bundle, written by the old writer path."""
    return export_bundle(checkpoints["full"], tmp_path_factory.mktemp("v1") / "b", sample_rows=48,
                         bundle_format=1)


@pytest.fixture(scope="module")
def v2(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v2")
    return {k: export_bundle(ck, root / k, sample_rows=48) for k, ck in checkpoints.items()}


def _rows() -> tuple[np.ndarray, np.ndarray]:
    d = open_source("synth:200:8").read_all()
    return d.dense, d.tokens


def test_format_1_bundle_is_still_read(v1: Path, v2: dict[str, Path]) -> None:
    m = json.loads((v1 / "manifest.json").read_text())
    assert m["bundle_format"] == 1
    assert {"model.pt2", "feature_map.npz", "embedding_state.npz"} <= set(m["files"])
    b = load_bundle(v1)
    assert b.format == 1 and b.feature_map().counts[0].sum() > 0
    report = verify_bundle(b)
    assert report.ok, report.table()
    dense, tokens = _rows()
    want = Predictor.open(v2["full"], "onnx").logits(dense, tokens)
    for engine in ("onnx", "program", "eager"):
        np.testing.assert_allclose(Predictor.open(v1, engine).logits(dense, tokens), want,
                                   rtol=1e-5, atol=1e-5)


def test_tampered_format_1_and_unknown_formats_are_refused(v1: Path, tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(v1, d)
    f = d / "model.pt2"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.pt2.*changed after export"):
        load_bundle(d)
    m = json.loads((d / "manifest.json").read_text())
    m["bundle_format"] = 3
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"bundle_format 3 is not supported .*reads 1, 2.*re-export"):
        load_bundle(d)


def test_bundle_with_an_old_key_table_is_refused(v2: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(v2["full"], d)
    m = json.loads((d / "manifest.json").read_text())
    nodes = m["onnx"]["custom_op"]["nodes"]
    assert {n["op_type"] for n in nodes} == {"KeyLookup"}  # the tables and the first-order term
    assert {n["table_version"] for n in nodes} == {hashspec.KEY_TABLE_VERSION} == {3}
    for old in (1, 2):  # what bundles written before key tables v2 and v3 record
        nodes[0]["table_version"] = old
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=rf"KeyLookup node has table_version {old}.*reads "
                                              r"key tables v3.*re-export"):
            load_bundle(d)


def test_format_2_holds_each_byte_once(v2: dict[str, Path], checkpoints: dict[str, Path]) -> None:
    for kind, d in v2.items():
        b = load_bundle(d)
        files = set(b.manifest["files"])
        # No training counts: the small schema JSON only (the full tables' vocabulary is in
        # their weights), no torch program unless asked for.
        assert "feature_map.npz" not in files and "vocabulary.npz" not in files
        assert "model.pt2" not in files and "model.onnx.data" not in files
        # LMA's signatures only in the hash serving form (the hot form folds them into its rows).
        assert ("embedding_state.npz" in files) == (kind == "lma" and b.lma_serving == "hash")
        # Every ONNX initializer of any size lives in weights.safetensors; those with a state
        # dict twin point at that very tensor.
        model = onnx.load(str(d / "model.onnx"), load_external_data=False)
        header, start = tensorfile.header(d / "weights.safetensors")
        big = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL
               and len(i.raw_data) >= 1 << 16]
        assert big == []
        table = next(i for i in model.graph.initializer if i.name in
                     ("embedding.table.weight", "embedding.memory"))
        ext = {e.key: e.value for e in table.external_data}
        assert ext["location"] == "weights.safetensors"
        assert int(ext["offset"]) == start + header[table.name]["data_offsets"][0]
        emb_bytes = b.component_bytes()["embedding"]
        # (the LMA hot form's precomputed rows are embedding bytes too)
        held = [n for n in (table.name, "embedding.hot") if n in header]
        assert sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0]
                   for n in held) == emb_bytes
        # The embedding is stored once: all files together hold less than twice it.
        assert sum(b.file_bytes().values()) < 2 * emb_bytes + 600_000
        ck_sd = torch.load(checkpoints[kind] / "checkpoint.pt", weights_only=False)["state_dict"]
        w = b.weights()
        # The hot form holds the hot rows and their key table instead of the signature table.
        swapped = ({k for k in ck_sd if k.startswith("embedding.key_table.")}
                   if b.lma_serving == "hot" else set())
        hot = ({"embedding.hot", "embedding.hot_lookup.table", "embedding.hot_lookup.header"}
               if b.lma_serving == "hot" else set())
        assert (set(ck_sd) - swapped) | hot == set(b.manifest["weights"]["state_dict"])
        for k, v in ck_sd.items():
            if k not in swapped:
                np.testing.assert_array_equal(np.asarray(w[k]), v.numpy())


def test_weights_file_is_safetensors(v2: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    d = v2["lma"]
    theirs = load_file(str(d / "weights.safetensors"))
    ours = tensorfile.read(d / "weights.safetensors")
    assert set(theirs) == set(ours)
    for k in theirs:
        np.testing.assert_array_equal(theirs[k], ours[k])
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int64),
              "e": np.zeros((0, 3), np.float32)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    back = tensorfile.read(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(tensorfile.TensorFileError, match="bad header"):
        tensorfile.read(tmp_path / "bad.safetensors")


def test_tampered_weights_are_refused(v2: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "b"
    shutil.copytree(v2["full"], d)
    f = d / "weights.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 100)
        b = fh.read(1)
        fh.seek(f.stat().st_size - 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"weights\.safetensors.*changed after export"):
        load_bundle(d)
    assert cli.main(["verify", str(d)]) == 2


def test_engines_agree_and_program_is_optional(v2: dict[str, Path], checkpoints: dict[str, Path],
                                               tmp_path: Path) -> None:
    dense, tokens = _rows()
    for d in v2.values():
        b = load_bundle(d)
        assert b.program_path is None
        with pytest.raises(BundleError, match="no torch program"):
            Predictor.open(d, "program")
        report = verify_bundle(b)
        assert report.ok, report.table()
        onnx_l = Predictor.open(d, "onnx").logits(dense, tokens)
        np.testing.assert_allclose(Predictor.open(d, "eager").logits(dense, tokens), onnx_l,
                                   rtol=1e-5, atol=1e-5)
    d = tmp_path / "with_program"
    assert cli.main(["export", str(checkpoints["lma"]), "--out", str(d), "--torch-program",
                     "--sample-rows", "32"]) == 0
    assert load_bundle(d).program_path is not None
    assert cli.main(["verify", str(d)]) == 0
    np.testing.assert_allclose(Predictor.open(d, "program").logits(dense, tokens),
                               Predictor.open(d, "onnx").logits(dense, tokens), rtol=1e-5, atol=1e-5)


def test_serving_path_unpickles_nothing(v2: dict[str, Path]) -> None:
    """onnx and eager engines of a format 2 bundle: with every unpickling entry point made to
    fail, they still open, warm up and score."""
    code = (
        "import pickle, sys\n"
        "import torch, torch._dynamo, torch._weights_only_unpickler as wou\n"
        "import lma.ops\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('unpickling on the serving path')\n"
        "pickle.load = pickle.loads = refuse\n"
        "torch.load = torch.serialization.load = refuse\n"
        "wou.Unpickler.load = refuse\n"
        "from lma.predictor import Predictor\n"
        "for d in sys.argv[1:]:\n"
        "    for engine in ('onnx', 'eager'):\n"
        "        p = Predictor.open(d, engine)\n"
        "        p.warmup(rows=64)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, v2.values())], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_checkpoints_load_without_unpickling_code(checkpoints: dict[str, Path],
                                                  tmp_path: Path) -> None:
    d = tmp_path / "ck"
    shutil.copytree(checkpoints["lma"], d)
    payload = torch.load(d / "checkpoint.pt", weights_only=False)
    payload["train_config"]["evil"] = _Evil()
    torch.save(payload, d / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a readable checkpoint.*[Ww]eights only"):
        load_checkpoint(d)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("this ran while unpickling",))


def test_lean_rebuild_takes_the_weights_without_copy_or_init(
        checkpoints: dict[str, Path], v2: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(checkpoints["full"])
    assert "lean load" not in caplog.text
    payload = torch.load(checkpoints["full"] / "checkpoint.pt", weights_only=True, mmap=True)
    sd = payload["state_dict"]
    model = rebuild_model(payload["model_config"], payload["embedding_config"], ck.feature_map,
                          checkpoints["full"] / "embedding_state.npz", weights=sd)
    w = model.embedding.table.weight
    assert w.data_ptr() == sd["embedding.table.weight"].data_ptr()  # the loaded tensor itself
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    dense, tokens = _rows()
    with torch.no_grad():
        np.testing.assert_array_equal(model(torch.from_numpy(dense), torch.from_numpy(tokens)),
                                      ck.model(torch.from_numpy(dense), torch.from_numpy(tokens)))
    b = load_bundle(v2["lma"])
    with caplog.at_level(logging.WARNING):
        eager = b.eager_model()
    assert "lean load" not in caplog.text
    mem = eager.embedding.memory
    assert isinstance(b.weights()["embedding.memory"], np.memmap)
    assert mem.untyped_storage().nbytes() == mem.numel() * 4
    with pytest.raises(ValueError, match="do not fit"):
        bad = dict(sd)
        bad["embedding.table.weight"] = sd["embedding.table.weight"][:-1]
        rebuild_model(payload["model_config"], payload["embedding_config"], ck.feature_map,
                      checkpoints["full"] / "embedding_state.npz", weights=bad)


def test_checkpoint_configs_are_saved_as_plain_values(checkpoints: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """numpy scalars and paths in a run's config or history must not make the checkpoint
    unreadable by the weights-only loader."""
    from lma.checkpoint import save_checkpoint

    ck = load_checkpoint(checkpoints["lma"])
    save_checkpoint(tmp_path / "ck", ck.model, ck.feature_map, {},
                    train_config={"data": Path("/x/y.tsv"), "fractions": (0.8, 0.1, 0.1),
                                  "lr": np.float32(0.5)},
                    history=[{"val_auc": np.float64(0.75), "epoch": np.int64(1)}])
    back = load_checkpoint(tmp_path / "ck")
    assert back.config["train_config"] == {"data": "/x/y.tsv", "fractions": (0.8, 0.1, 0.1),
                                           "lr": 0.5}
    assert back.config["history"] == [{"val_auc": 0.75, "epoch": 1}]
