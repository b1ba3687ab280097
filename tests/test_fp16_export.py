"""Float16 tables (`lma export --dtype float16`): stored in half the bytes, computed in float32,
within a documented tolerance of the float32 model on real Criteo rows, served by every engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lma import tensorfile
from lma.data import open_source
from lma.predictor import Predictor
from lma.train import TrainConfig, train_model
from model_export import cuda_kernels
from model_export.bundle import FLOAT16_KINDS, export_bundle, load_bundle
from model_export.cli import main as export_cli
from model_export.verify import FLOAT16_TOLERANCE, verify_bundle

KINDS = ["full", "lma", "robez", "hash"]
ROWS = 2000


@pytest.fixture(scope="module")
def criteo(shared_data: Path) -> dict[str, str]:
    return {"train": f"criteo:{shared_data / 'criteo' / 'train_10k.tsv'}",
            "test": f"criteo-test:{shared_data / 'criteo' / 'test_10k_unlabeled.tsv'}"}


@pytest.fixture(scope="module")
def pairs(criteo: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, tuple[Path, Path]]:
    """kind -> (float32 bundle, float16 bundle) of one model trained on the real Criteo sample."""
    root = tmp_path_factory.mktemp("fp16")
    out = {}
    for kind in KINDS:
        ck = root / f"ck_{kind}"
        train_model(TrainConfig(data=criteo["train"], embedding=kind,
                                compression=1.0 if kind == "full" else 4.0, epochs=2,
                                progress=False, threads=1, out=str(ck),
                                first_order=kind == "full"))
        b32 = export_bundle(ck, root / f"b32_{kind}", data=criteo["test"], sample_rows=256)
        b16 = export_bundle(ck, root / f"b16_{kind}", data=criteo["test"], sample_rows=256,
                            dtype="float16", torch_program=kind in ("full", "lma"))
        out[kind] = (b32, b16)
    return out


def _rows(spec: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    data = open_source(spec).read_all()
    return (np.ascontiguousarray(data.dense[:n], np.float32),
            np.ascontiguousarray(data.tokens[:n], np.int64))


@pytest.mark.parametrize("kind", KINDS)
def test_tables_are_stored_in_half_the_bytes(pairs: dict[str, tuple[Path, Path]],
                                             kind: str) -> None:
    b32, b16 = (load_bundle(p) for p in pairs[kind])
    dt = b16.manifest["dtype"]
    assert dt["dtype"] == "float16" and dt["compute"] == "float32"
    assert b32.manifest["dtype"]["dtype"] == "float32" and b32.manifest["dtype"]["cast"] == []
    # The embedding's float tables, and the first-order term's scalars where there is one.
    cast = set(dt["cast"])
    assert {n.split(".")[0] for n in cast} == ({"embedding", "first_order"} if kind == "full"
                                               else {"embedding"})
    header, _ = tensorfile.header(b16.file("weights.safetensors"))
    for name in cast:
        assert header[name]["dtype"] == "F16", name
    assert {header[n]["dtype"] for n in header if n.startswith(("bottom", "top"))} == {"F32"}
    c32, c16 = b32.component_bytes(), b16.component_bytes()
    assert c16["embedding"] * 2 == c32["embedding"] > 0
    assert c16["key_lookup"] == c32["key_lookup"] and c16["mlp"] == c32["mlp"]
    w32 = b32.manifest["files"]["weights.safetensors"]["bytes"]
    w16 = b16.manifest["files"]["weights.safetensors"]["bytes"]
    # The file shrinks by half the tables (page alignment moves it by at most a few pages).
    fo32 = b32.manifest["parameters"].get("first_order", {}).get("bytes", 0)
    saved = (c32["embedding"] + fo32) // 2
    assert abs((w32 - w16) - saved) <= 3 * tensorfile.ALIGN
    # An LMA bundle in the hot serving form: its precomputed rows, computed from the float16
    # memory and so float16 too, are embedding bytes beside the memory parameter.
    hot = header.get("embedding.hot")
    hot_bytes = 0
    if b16.lma_serving == "hot":
        assert hot is not None and hot["dtype"] == "F16"
        hot_bytes = 2 * int(np.prod(hot["shape"]))
    assert b16.manifest["parameters"]["embedding"]["bytes"] + hot_bytes == c16["embedding"]


@pytest.mark.parametrize("kind", KINDS)
def test_float16_scores_real_rows_within_tolerance(pairs: dict[str, tuple[Path, Path]],
                                                   criteo: dict[str, str], kind: str) -> None:
    b32, b16 = pairs[kind]
    dense, tokens = _rows(criteo["test"], ROWS)
    ref = Predictor.open(b32).logits(dense, tokens).astype(np.float64)
    got = Predictor.open(b16).logits(dense, tokens).astype(np.float64)
    diff = np.abs(got - ref)
    assert np.all(diff <= FLOAT16_TOLERANCE * np.maximum(1.0, np.abs(ref))), diff.max()
    assert diff.max() > 0, "float16 rounding changed nothing: were the tables cast?"
    # The engines of the float16 bundle agree with each other as closely as float32 ones do.
    eager = Predictor.open(b16, engine="eager").logits(dense, tokens)
    np.testing.assert_allclose(eager, got, rtol=1e-5, atol=1e-5)
    if kind in ("full", "lma"):
        prog = Predictor.open(b16, engine="program").logits(dense, tokens)
        np.testing.assert_allclose(prog, got, rtol=1e-5, atol=1e-5)
    # The eager model keeps its tables in float16 (nothing widened them at load).
    model = load_bundle(b16).eager_model()
    assert {str(p.dtype) for n, p in model.embedding.named_parameters()} == {"torch.float16"}


@pytest.mark.parametrize("kind", ["full", "lma"])
def test_onnx_casts_right_after_the_gather_and_cuda_has_kernels(
        pairs: dict[str, tuple[Path, Path]], kind: str) -> None:
    model = onnx.load(str(pairs[kind][1] / "model.onnx"), load_external_data=False)
    f16 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert f16, "no float16 initializer"
    readers = [n for n in model.graph.node if n.input and n.input[0] in f16]
    assert readers and {n.op_type for n in readers} <= {"Gather", "HashedGather", "HotGather"}
    consumers = {i: n for n in model.graph.node for i in n.input}
    for r in readers:
        cast = consumers[r.output[0]]
        assert cast.op_type == "Cast", (r.op_type, cast.op_type)
        assert next(a.i for a in cast.attribute if a.name == "to") == onnx.TensorProto.FLOAT
    assert cuda_kernels.cuda_problems(onnx.load(str(pairs[kind][1] / "model.onnx"))) == []


def test_verify_compares_with_the_float32_model(pairs: dict[str, tuple[Path, Path]]) -> None:
    report = verify_bundle(load_bundle(pairs["lma"][1]))
    assert report.ok, report.table()
    line = next(ln for ln in report.lines if ln["engine"].startswith("float32 model"))
    assert 0 < line["max_logit_diff"] <= FLOAT16_TOLERANCE
    assert "float16 tables" in report.table()


def test_cli_dtype_option_and_refusals(pairs: dict[str, tuple[Path, Path]], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ck = Path(load_bundle(pairs["hash"][0]).manifest["source_checkpoint"])
    assert export_cli(["export", str(ck), "--out", str(tmp_path / "b"), "--dtype",
                       "float16"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["dtype"]["dtype"] == "float16"
    with pytest.raises(ValueError, match="dtype"):
        export_bundle(ck, tmp_path / "c", dtype="bfloat16")
    with pytest.raises(ValueError, match="format 2"):
        export_bundle(ck, tmp_path / "d", dtype="float16", bundle_format=1)
    assert "qr" not in FLOAT16_KINDS


def test_qr_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck_qr"
    train_model(TrainConfig(data="synth:600:1", embedding="qr", compression=4.0, epochs=1,
                            progress=False, threads=1, out=str(ck)))
    with pytest.raises(ValueError, match="qr"):
        export_bundle(ck, tmp_path / "b", dtype="float16")


def test_the_service_serves_float16_tables(pairs: dict[str, tuple[Path, Path]],
                                           shared_data: Path, tmp_path: Path) -> None:
    """A real uvicorn process on the float16 LMA bundle answers real Criteo rows as the
    bundle's own Predictor scores them."""
    import csv

    import requests

    from loadtest.bench_serve import ServerSettings, serve

    bundle = pairs["lma"][1]
    src = shared_data / "criteo" / "test_10k_unlabeled.tsv"
    with open(src) as f:
        lines = [next(f) for _ in range(50)]
    part = tmp_path / "rows.tsv"
    part.write_text("".join(lines))
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    records = [{n: (int(v) if n.startswith("I") else v)
                for n, v in zip(names, cells, strict=True) if v != ""}
               for cells in csv.reader(lines, delimiter="\t")]
    dense, tokens = _rows(f"criteo-test:{part}", 50)
    want = Predictor.open(bundle).predict(dense, tokens)
    name = load_bundle(bundle).name
    with serve(bundle, ServerSettings(cpus=None), tmp_path / "server.log",
               ready_timeout_s=120) as srv:
        r = requests.post(f"{srv.url}/v1/models/{name}:predict", json={"instances": records},
                          timeout=30)
        info = requests.get(f"{srv.url}/v1/models/{name}", timeout=10).json()
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], want, rtol=1e-5, atol=1e-6)
    assert info["bytes"]["embedding"] * 2 == load_bundle(pairs["lma"][0]).component_bytes()[
        "embedding"]
