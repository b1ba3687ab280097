"""A full-table model with a first-order term stores its token -> row map once: the first-order
scalars read their rows from the embedding's key table. Checkpoints and bundles written when
both tables held their own copy (the old form, reproduced here by turning the sharing off while
writing) still load, dropping the copy, with bit-identical outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lma.embeddings.tables as tables
from lma import tensorfile
from lma.bundle import WEIGHTS_FILE, load_bundle
from lma.checkpoint import load_checkpoint, save_checkpoint
from lma.predictor import Predictor
from lma.train import TrainConfig, train_model
from model_export.bundle import export_bundle


def _train(out: Path, lookup: str = "table") -> Path:
    train_model(TrainConfig(data="synth:2000:1", embedding="full", compression=1.0, epochs=1,
                            warmup_epochs=1, first_order=True, batch_size=256, progress=False,
                            threads=1, options={"lookup": lookup}, out=str(out)))
    return out


def _rows(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    from lma.data import open_source

    data = open_source("synth:300:5").read_all()
    tokens = data.tokens[:n].copy()
    tokens[:20, :3] = np.arange(1, 61).reshape(20, 3) * 104729  # unseen tokens
    return data.dense[:n], tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("fo") / "ck")


def _old_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the writers did before the map was shared: every full table its own copy."""
    monkeypatch.setattr(tables, "shares_vocabulary", lambda spec, other: False)


def _assert_loads_shared_with_same_logits(old_model: torch.nn.Module, path: Path) -> None:
    """The checkpoint at ``path`` loads with one shared map and scores like ``old_model``."""
    d, t = _rows()
    with torch.no_grad():
        want = old_model(torch.from_numpy(d), torch.from_numpy(t))
        new = load_checkpoint(path).model
        assert new.shared_rows
        assert torch.equal(new(torch.from_numpy(d), torch.from_numpy(t)), want)


def test_model_holds_and_stores_the_map_once(trained: Path) -> None:
    model = load_checkpoint(trained).model
    assert model.shared_rows and model.first_order.rows_from is model.embedding
    keys = [k for k in model.state_dict() if "key_table" in k or k.endswith("vocab")]
    assert keys == ["embedding.key_table.table", "embedding.key_table.header"]
    assert model.first_order.state_bytes() == 0
    d, t = _rows()
    # The first-order rows are the embedding's: the same map, the same OOV rows.
    tt = torch.from_numpy(t)
    assert torch.equal(model.first_order.rows(tt), model.embedding.rows(tt))


def test_old_checkpoint_loads_with_identical_outputs(trained: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _old_form(m)
        old = load_checkpoint(trained)
        assert not old.model.shared_rows
        sd = old.model.state_dict()
        assert "first_order.key_table.table" in sd
        assert torch.equal(sd["first_order.key_table.table"], sd["embedding.key_table.table"])
        save_checkpoint(tmp_path / "old", old.model, old.feature_map, old.metrics)
    _assert_loads_shared_with_same_logits(old.model, tmp_path / "old")


def test_old_checkpoint_with_a_different_copy_is_refused(trained: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _old_form(m)
        old = load_checkpoint(trained)
        with torch.no_grad():
            old.model.first_order.key_table.table[0, 0] += 1
        save_checkpoint(tmp_path / "bad", old.model, old.feature_map, old.metrics)
    with pytest.raises(ValueError, match="first_order: the stored table differs"):
        load_checkpoint(tmp_path / "bad")


def test_bundle_stores_one_key_table_and_old_bundles_still_load(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _old_form(m)
        old_b = export_bundle(trained, tmp_path / "old", sample_rows=64, torch_program=True)
    new_b = export_bundle(trained, tmp_path / "new", sample_rows=64, torch_program=True)
    old_h, _ = tensorfile.header(old_b / WEIGHTS_FILE)
    new_h, _ = tensorfile.header(new_b / WEIGHTS_FILE)
    assert set(old_h) - set(new_h) == {"first_order.key_table.table", "first_order.key_table.header"}
    assert set(new_h) - set(old_h) == set()
    table = new_h["embedding.key_table.table"]
    table_bytes = table["data_offsets"][1] - table["data_offsets"][0]
    saved = (old_b / WEIGHTS_FILE).stat().st_size - (new_b / WEIGHTS_FILE).stat().st_size
    # One key table (and its 24-byte header), give or take the file's alignment padding.
    assert table_bytes + 24 <= saved < table_bytes + 24 + 4096, (saved, table_bytes)
    lookups = {b: [n for n in onnx.load(str(b / "model.onnx"), load_external_data=False).graph.node
                   if n.op_type == "KeyLookup"] for b in (old_b, new_b)}
    assert (len(lookups[old_b]), len(lookups[new_b])) == (2, 1)
    d, t = _rows()
    out = {}
    for b in (old_b, new_b):
        for engine in ("onnx", "program", "eager"):
            p = Predictor.open(load_bundle(b), engine=engine)
            p.warmup(64)  # against the logits saved at export
            out[b.name, engine] = p.logits(d, t)
    for engine in ("onnx", "program", "eager"):
        np.testing.assert_array_equal(out["old", engine], out["new", engine])
    np.testing.assert_array_equal(out["new", "program"], out["new", "eager"])


def test_checkpoint_from_before_key_tables_loads(trained: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Checkpoints written before key tables were stored hold each full table's sorted
    # vocabulary (``vocab``) instead; the embedding builds its table from it, the first-order
    # term drops its copy.
    import shutil

    with monkeypatch.context() as m:
        _old_form(m)
        old = load_checkpoint(trained)
    payload = torch.load(trained / "checkpoint.pt", weights_only=True)
    sd = {k: v for k, v in old.model.state_dict().items() if ".key_table." not in k}
    fmap = old.feature_map
    vocab = torch.from_numpy(np.sort(np.concatenate(fmap.vocab(1))))
    sd["embedding.vocab"] = vocab
    sd["first_order.vocab"] = vocab.clone()
    shutil.copytree(trained, tmp_path / "pre", ignore=shutil.ignore_patterns("checkpoint.pt"))
    torch.save({**payload, "state_dict": sd}, tmp_path / "pre" / "checkpoint.pt")
    _assert_loads_shared_with_same_logits(old.model, tmp_path / "pre")
    sd["first_order.vocab"] = vocab[:-1].clone()
    torch.save({**payload, "state_dict": sd}, tmp_path / "pre" / "checkpoint.pt")
    with pytest.raises(ValueError, match="first_order: the stored vocabulary has"):
        load_checkpoint(tmp_path / "pre")


def test_binary_search_embedding_keeps_the_first_order_table(tmp_path: Path) -> None:
    # The first-order term always uses a key table; beside a binary-search embedding the two
    # maps differ in form, so each keeps its own.
    model = load_checkpoint(_train(tmp_path / "ck", lookup="search")).model
    assert not model.shared_rows
    assert {"embedding.vocab", "first_order.key_table.table"} <= set(model.state_dict())


def test_different_thresholds_keep_their_own_tables(tmp_path: Path) -> None:
    train_model(TrainConfig(data="synth:2000:1", embedding="full", compression=1.0, epochs=1,
                            warmup_epochs=1, first_order=True, first_order_min_count=3,
                            batch_size=256, progress=False, threads=1, out=str(tmp_path / "ck")))
    model = load_checkpoint(tmp_path / "ck").model
    assert not model.shared_rows
    assert "first_order.key_table.table" in model.state_dict()
