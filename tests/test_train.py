import json

import numpy as np
import pytest
import torch

from lma.checkpoint import load_checkpoint
from lma.cli import main as cli_main
from lma.data import open_source
from lma.train import TrainConfig, evaluate, train_model


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(data="synth:3000:1", epochs=2, batch_size=256, progress=False, threads=1,
                out=str(tmp_path / "ck"))
    base.update(kw)
    return TrainConfig(**base)


def test_training_smoke_learns_and_checkpoints(tmp_path):
    res = train_model(_cfg(tmp_path, epochs=4, lr=3e-3, patience=4))
    m = res.metrics
    for key in ("test_auc", "test_logloss", "val_auc", "train_rows_per_s", "embedding_params",
                "serving_bytes"):
        assert key in m
    assert m["test_auc"] > 0.6  # the synthetic data has a learnable signal
    assert m["rows"] == {"train": 2400, "val": 300, "test": 300}
    saved = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    assert saved["test_auc"] == pytest.approx(m["test_auc"])
    # The checkpoint rebuilds the same model from its own config.
    ck = load_checkpoint(tmp_path / "ck")
    data = open_source("synth:3000:1").read_all()
    a = evaluate(ck.model, data)
    b = evaluate(res.model, data)
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-12)


def test_training_is_deterministic(tmp_path):
    m1 = train_model(_cfg(tmp_path, out=None, epochs=1)).metrics
    m2 = train_model(_cfg(tmp_path, out=None, epochs=1)).metrics
    assert m1["test_auc"] == m2["test_auc"]
    assert m1["test_logloss"] == m2["test_logloss"]


def test_compression_sets_the_budget(tmp_path):
    full = train_model(_cfg(tmp_path, out=None, epochs=1)).metrics
    hashed = train_model(_cfg(tmp_path, out=None, epochs=1, embedding="hash", compression=8)).metrics
    assert hashed["embedding_params"] == pytest.approx(full["embedding_params"] / 8, rel=0.01)
    assert hashed["serving_bytes"] < full["serving_bytes"]


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compression 1"):
        train_model(_cfg(tmp_path, compression=4))
    with pytest.raises(ValueError, match="--embedding"):
        train_model(_cfg(tmp_path, embedding="nope"))
    # The LMA hot serving form is made at export; training it is refused before any data is read.
    with pytest.raises(ValueError, match="serve=hot: training needs serve=hash"):
        train_model(_cfg(tmp_path, embedding="lma", compression=4, options={"serve": "hot"}))


def test_cli_refuses_training_the_hot_form(capsys):
    rc = cli_main(["-q", "train", "--data", "synth:2000:3", "--embedding", "lma",
                   "--compression", "4", "--option", "serve=hot", "--epochs", "1"])
    assert rc == 2
    assert "lma export --lma-serving" in capsys.readouterr().err


def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["-q", "train", "--data", "synth:2000:3", "--embedding", "hash",
                   "--compression", "4", "--epochs", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["test_auc"] <= 1.0
    rc = cli_main(["-q", "evaluate", str(out), "--data", "synth:2000:3", "--split", "test"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["rows"] == 200
    assert ev["auc"] == pytest.approx(metrics["test_auc"], abs=1e-9)


def test_cli_reports_bad_data_spec(capsys):
    rc = cli_main(["-q", "train", "--data", "nosuch:thing", "--epochs", "1"])
    assert rc == 2
    assert "nosuch" in capsys.readouterr().err


def test_real_criteo_sample_trains(shared_data, tmp_path):
    m = train_model(_cfg(tmp_path, data=f"criteo:{shared_data / 'criteo' / 'train_10k.tsv'}",
                         out=None, epochs=1)).metrics
    assert np.isfinite(m["test_auc"]) and m["rows"]["train"] == 8000


def test_cli_data_synth_and_stats(tmp_path, capsys):
    out = tmp_path / "s.tsv"
    assert cli_main(["-q", "data", "synth", "--rows", "500", "--seed", "2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 500
    lines = out.read_text().splitlines()
    assert len(lines) == 500 and len(lines[0].split("\t")) == 40
    assert cli_main(["-q", "data", "stats", "--data", f"criteo:{out}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 500
    # The written file reads back as the same rows the synth: source yields.
    a = open_source(f"criteo:{out}").read_all()
    b = open_source("synth:500:2").read_all()
    assert np.array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6)


def test_device_option(tmp_path):
    import torch

    m = train_model(_cfg(tmp_path, out=None, epochs=1, device="auto")).metrics
    assert m["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_model(_cfg(tmp_path, device="cuda"))
    with pytest.raises(ValueError, match="--device"):
        train_model(_cfg(tmp_path, device="tpu"))


def test_damaged_or_old_checkpoint_is_refused_clearly(tmp_path):
    import torch

    train_model(_cfg(tmp_path, epochs=1))
    ck = tmp_path / "ck" / "checkpoint.pt"
    payload = torch.load(ck, weights_only=False)
    payload["state_dict"].pop("dense_mean")
    torch.save(payload, ck)
    with pytest.raises(ValueError, match="do not fit the model"):
        load_checkpoint(tmp_path / "ck")
    payload["format"] = 1
    torch.save(payload, ck)
    with pytest.raises(ValueError, match="checkpoint format 1"):
        load_checkpoint(tmp_path / "ck")


def test_evaluate_refuses_unlabelled_rows(tmp_path, capsys):
    train_model(_cfg(tmp_path, epochs=1))
    tsv = tmp_path / "t.tsv"
    tsv.write_text("\t".join(["1"] * 13 + ["abc"] * 26) + "\n")
    rc = cli_main(["-q", "evaluate", str(tmp_path / "ck"), "--data", f"criteo-test:{tsv}"])
    assert rc == 2 and "labelled" in capsys.readouterr().err


def test_first_order_warmup_then_joint(tmp_path):
    res = train_model(_cfg(tmp_path, epochs=3, patience=3, first_order=True, warmup_epochs=3,
                           first_order_lr=3e-3, lr=3e-3))
    phases = [h["phase"] for h in res.history]
    assert phases[0] == "wide" and phases[-1] == "joint"
    assert phases.count("wide") <= 3 and phases.count("joint") <= 3
    m = res.metrics
    assert m["first_order_params"] == res.feature_map.full_table_rows(1)
    assert m["test_auc"] > 0.6
    # The best epoch over both phases is what was kept and saved; the checkpoint reloads it.
    assert m["val_auc"] == pytest.approx(max(h["val_auc"] for h in res.history), abs=1e-12)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model.first_order is not None
    data = open_source("synth:3000:1").read_all()
    assert evaluate(ck.model, data)["auc"] == pytest.approx(evaluate(res.model, data)["auc"],
                                                            abs=1e-12)


def test_first_order_without_warmup_and_on_a_compressed_kind(tmp_path):
    res = train_model(_cfg(tmp_path, out=None, epochs=1, embedding="hash", compression=8,
                           first_order=True, warmup_epochs=0))
    assert [h["phase"] for h in res.history] == ["joint"]
    m = res.metrics
    # Compressed kinds hash tokens into embedding_params / dim scalars.
    assert m["first_order_params"] == m["embedding_params"] // 16
    plain = train_model(_cfg(tmp_path, out=None, epochs=1, embedding="hash", compression=8)).metrics
    assert m["serving_bytes"] == plain["serving_bytes"] + 4 * (m["first_order_params"] + 14)


def test_cli_first_order_options(tmp_path, capsys):
    out = tmp_path / "fo"
    rc = cli_main(["-q", "train", "--data", "synth:2000:3", "--epochs", "1", "--first-order",
                   "--first-order-l2", "1e-3", "--first-order-min-count", "2",
                   "--warmup-epochs", "2", "--out", str(out)])
    assert rc == 0
    ck = load_checkpoint(out)
    assert ck.model.config.first_order["min_count"] == 2
    assert ck.config["train_config"]["first_order_l2"] == 1e-3
    rc = cli_main(["-q", "train", "--data", "synth:2000:3", "--warmup-epochs", "-1"])
    assert rc != 0
    assert "--warmup-epochs" in capsys.readouterr().err


def test_l2_on_sparse_tables_is_reported(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="lma.train"):
        train_model(_cfg(tmp_path, out=None, epochs=1, embedding="robez", compression=4,
                         options={"sparse": True}, weight_decay=1e-4))
    assert "--weight-decay: not applied" in caplog.text


def test_evaluate_uses_the_checkpoints_time_split(shared_data, tmp_path, capsys):
    # Avazu's schema has a time column; a time-split checkpoint's "test" rows are the latest
    # 10%, not a random 10%, and `lma evaluate --split test` must score those.
    data = f"avazu:{shared_data / 'avazu' / 'train_9999.csv'}"
    out = tmp_path / "timeck"
    rc = cli_main(["-q", "train", "--data", data, "--split", "time", "--epochs", "1",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    rc = cli_main(["-q", "evaluate", str(out), "--data", data, "--split", "test"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["rows"] == metrics["rows"]["test"]
    assert ev["auc"] == pytest.approx(metrics["test_auc"], abs=1e-9)
    assert ev["split_kind"] == "time"


def test_weight_decay_kept_for_dense_groups_with_sparse_tables(tmp_path):
    from lma.features import FeatureMap
    from lma.train import build_model, load_splits, make_optimizers

    for name in ("adagrad", "sgd"):
        cfg = _cfg(tmp_path, out=None, embedding="robez", compression=4, options={"sparse": True},
                   optimizer=name, weight_decay=1e-3)
        splits, _ = load_splits(cfg)
        fmap = FeatureMap.build(splits.schema, [splits.train])
        model = build_model(cfg, fmap, splits.train.tokens)
        opts = make_optimizers(cfg, model)
        sparse = {id(p) for p in model.embedding.sparse_parameters()}
        assert sparse
        mlp = {id(p) for p in model.top.parameters()}
        seen_dense: set[int] = set()
        for o in opts:
            for g in o.param_groups:
                ids = {id(p) for p in g["params"]}
                if ids & sparse:
                    assert not ids - sparse, "a sparse table shares a group with dense params"
                    assert g["weight_decay"] == 0.0
                else:
                    assert g["weight_decay"] == 1e-3, f"{name}: dense group lost weight decay"
                    seen_dense |= ids
        assert mlp <= seen_dense
        # Both steps work with the sparse gradient.
        batch = splits.train
        logits = model(torch.from_numpy(batch.dense[:64]), torch.from_numpy(batch.tokens[:64]))
        logits.sum().backward()
        for o in opts:
            o.step()


def test_nan_validation_auc_still_keeps_a_best_state(tmp_path):
    # A validation set with one class only: AUC is NaN every epoch. Training must still end
    # with a best state (the first epoch), not crash or keep nothing.
    from lma.train import Splits, load_splits

    cfg = _cfg(tmp_path, out=str(tmp_path / "nan"), epochs=2, first_order=True, warmup_epochs=2)
    splits, _ = load_splits(cfg)
    val = splits.val
    val.labels = np.zeros_like(val.labels)
    res = train_model(cfg, Splits(splits.schema, splits.train, val, splits.test))
    assert res.metrics["best_epoch"] >= 1
    assert np.isnan(res.metrics["val_auc"])
    assert np.isfinite(res.metrics["test_auc"])
