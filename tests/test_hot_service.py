"""The LMA hot serving form through the real service: a uvicorn process on a hot bundle answers
real Criteo rows exactly as one on the hash-form bundle of the same checkpoint, with the
onnxruntime backend and with the torch backend."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lma.train import TrainConfig, train_model
from model_export.bundle import export_bundle, load_bundle

N_ROWS = 60


@pytest.fixture(scope="module")
def bundles(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hot_service")
    ck = root / "ck"
    train_model(TrainConfig(data=f"criteo:{shared_data / 'criteo' / 'train_10k.tsv'}",
                            embedding="lma", compression=4.0, epochs=1, progress=False,
                            threads=1, out=str(ck)))
    test = f"criteo-test:{shared_data / 'criteo' / 'test_10k_unlabeled.tsv'}"
    return {form: export_bundle(ck, root / form, data=test, sample_rows=128, lma_serving=form)
            for form in ("hash", "hot")}


@pytest.fixture(scope="module")
def records(shared_data: Path) -> list[dict[str, object]]:
    with open(shared_data / "criteo" / "test_10k_unlabeled.tsv") as f:
        lines = [next(f) for _ in range(N_ROWS)]
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    rows = [{n: (int(v) if n.startswith("I") else v)
             for n, v in zip(names, cells, strict=True) if v != ""}
            for cells in csv.reader(lines, delimiter="\t")]
    rows[0]["C3"] = "never-seen-in-training"  # a cold token in a hot bundle
    return rows


def test_bundles_are_in_the_two_forms(bundles: dict[str, Path]) -> None:
    assert load_bundle(bundles["hot"]).lma_serving == "hot"
    assert load_bundle(bundles["hash"]).lma_serving == "hash"
    assert not (bundles["hot"] / "embedding_state.npz").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_hot_bundle_serves_what_the_hash_bundle_serves(bundles: dict[str, Path],
                                                       records: list[dict[str, object]],
                                                       backend: str, tmp_path: Path) -> None:
    import requests

    from loadtest.bench_serve import ServerSettings, serve

    answers = {}
    for form, bundle in bundles.items():
        name = load_bundle(bundle).name
        with serve(bundle, ServerSettings(backend=backend, cpus=None),
                   tmp_path / f"{form}.log", ready_timeout_s=120) as srv:
            r = requests.post(f"{srv.url}/v1/models/{name}:predict",
                              json={"instances": records}, timeout=30)
            assert r.status_code == 200, r.text
            answers[form] = np.asarray(r.json()["predictions"], dtype=np.float64)
    assert answers["hot"].shape == (N_ROWS,)
    # Bit-identical logits in the model; the JSON round trip of the same float32 values.
    np.testing.assert_array_equal(answers["hot"], answers["hash"])


def test_the_model_profile_splits_both_forms(bundles: dict[str, Path]) -> None:
    """``lma bench serve``'s stage profile (loadtest.model_profile) cuts a hot bundle at its
    HotGather as it cuts a hash bundle at its HashedGather, on the sessions the service makes."""
    from lma import ort_ops
    from loadtest.model_profile import STAGES, StageModels

    for form, path in bundles.items():
        b = load_bundle(path)
        sample = b.sample()
        stages = StageModels(b, threads=1)
        try:
            assert stages.cuts["keys"] and stages.cuts["gather"], form
            assert stages.native_ops == (ort_ops.library() is not None)
            got = stages.profile([(sample["dense"], sample["tokens"])] * 2, seconds=0.05)
        finally:
            stages.close()
        assert set(STAGES) <= set(got) and all(got[k] >= 0 for k in STAGES), (form, got)
