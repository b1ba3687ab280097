"""Out-of-core training: the on-disk path trains the same model as the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lma import train as train_mod
from lma.data import open_source
from lma.data.store import EncodedStore, RowsView
from lma.optim import RowWiseAdagrad
from lma.train import TrainConfig, train_model


def _cfg(**kw) -> TrainConfig:
    base = dict(data="synth:3000:1", epochs=2, batch_size=256, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _same_models(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kw", [
    {},
    {"embedding": "lma", "compression": 4, "options": {"sample_rows": 1000}},
    {"embedding": "robez", "compression": 4, "options": {"sparse": True}, "optimizer": "rowwise",
     "epoch_rows": 1000},
    {"first_order": True, "warmup_epochs": 2, "patience": 1},
])
def test_streaming_equals_in_memory(tmp_path, kw):
    mem = train_model(_cfg(**kw))
    disk = train_model(_cfg(stream=True, work_dir=str(tmp_path / "w"), **kw))
    # Bit-exact: same rows, same order, same batches, same updates.
    _same_models(mem, disk)
    for key in ("test_auc", "test_logloss", "val_auc", "best_epoch"):
        assert mem.metrics[key] == disk.metrics[key], key
    assert mem.metrics["rows"] == disk.metrics["rows"]
    np.testing.assert_array_equal(np.concatenate(mem.feature_map.tokens),
                                  np.concatenate(disk.feature_map.tokens))


def test_spilled_best_state_equals_the_in_memory_copy(tmp_path, monkeypatch):
    # Patience 3 over 4 epochs at a high lr: a best state from before the last epoch is
    # restored; kept on disk it must give the same model as kept in memory.
    kw = dict(epochs=4, patience=3, lr=3e-2)
    ref = train_model(_cfg(**kw))
    monkeypatch.setattr(train_mod, "SPILL_BYTES", 0)
    spilled = train_model(_cfg(work_dir=str(tmp_path), **kw))
    _same_models(ref, spilled)
    assert (tmp_path / "best_state.pt").exists() == (ref.metrics["best_epoch"] < 4)


def test_store_round_trip_and_lazy_rows(tmp_path):
    src = open_source("synth:5000:2", chunk_rows=1234)
    store = EncodedStore.write(src, tmp_path / "rows")
    ref = open_source("synth:5000:2").read_all()
    assert len(store) == 5000
    idx = np.random.default_rng(0).permutation(5000)[:777]
    got = store.take(idx)
    np.testing.assert_array_equal(got.tokens, ref.tokens[idx])
    np.testing.assert_array_equal(got.dense, ref.dense[idx])
    np.testing.assert_array_equal(got.labels, ref.labels[idx])
    view = RowsView(store, idx)
    assert view.shape == (777, 26)
    np.testing.assert_array_equal(view[np.array([5, 0, 700])], ref.tokens[idx[[5, 0, 700]]])
    store.close()


@pytest.mark.parametrize("chunk_rows", [64, 1 << 16])
def test_store_reads_any_index_pattern(tmp_path, monkeypatch, chunk_rows):
    # Row by row (scattered rows), whole spans (dense sorted runs, split into spans of at most
    # CHUNK_ROWS records), repeats, reversed order and empty index arrays all read the records
    # the rows were written as.
    import lma.data.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_ROWS", chunk_rows)
    src = open_source("synth:6000:3", chunk_rows=999)
    store = EncodedStore.write(src, tmp_path / "rows")
    ref = open_source("synth:6000:3").read_all()
    rng = np.random.default_rng(1)
    cases = {
        "scattered": rng.choice(6000, 300, replace=False),
        "dense sorted": np.sort(rng.choice(6000, 5400, replace=False)),
        "dense shuffled": rng.permutation(6000),
        "repeats": np.array([5, 5, 5, 17, 5, 5999, 0, 0]),
        "mixed": np.concatenate([np.arange(100, 400), rng.integers(0, 6000, 200),
                                 np.arange(5800, 6000)[::-1]]),
        "one": np.array([4321]),
        "empty": np.zeros(0, np.int64),
    }
    for name, idx in cases.items():
        got = store.take(idx)
        np.testing.assert_array_equal(got.tokens, ref.tokens[idx], err_msg=name)
        np.testing.assert_array_equal(got.dense, ref.dense[idx], err_msg=name)
        np.testing.assert_array_equal(got.labels, ref.labels[idx], err_msg=name)
        np.testing.assert_array_equal(store.tokens(idx), ref.tokens[idx], err_msg=name)
    for bad in ([6000], [-1], [3, 6001]):
        with pytest.raises(IndexError, match="out of range for 6000 encoded rows"):
            store.take(np.array(bad))
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.take(np.array([1]))


def _mapped_kib(name: str) -> int | None:
    """Resident KiB of this process's mappings of files called ``name`` (None off Linux)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()  # noqa: SIM115
    except OSError:
        return None
    total, cur = 0, False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            cur = line.rstrip().endswith("/" + name)
        elif cur and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_reading_rows_maps_nothing_of_the_file(tmp_path):
    # The out-of-core promise: batches are read into private buffers, so however many rows are
    # read, none of the file's pages become part of the process (a memory map did: each
    # random row mapped its whole page-cache folio, up to 2 MB; docs/RESULTS.md).
    store = EncodedStore.write(open_source("synth:20000:1"), tmp_path / "rows")
    if _mapped_kib("rows.bin") is None:
        pytest.skip("needs /proc/self/smaps (Linux)")
    rng = np.random.default_rng(0)
    for _ in range(20):
        store.take(rng.integers(0, 20000, 512))
        assert _mapped_kib("rows.bin") == 0
    store.close()


def test_store_refuses_a_truncated_file_and_rewrites_it(tmp_path):
    a = EncodedStore.open_or_write(open_source("synth:2000:1"), tmp_path / "rows")
    a.close()
    path = tmp_path / "rows" / "rows.bin"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(ValueError, match="fewer than the 2000 records"):
        EncodedStore(tmp_path / "rows")
    b = EncodedStore.open_or_write(open_source("synth:2000:1"), tmp_path / "rows")
    assert len(b) == 2000 and path.stat().st_size == 2000 * b.dtype.itemsize
    np.testing.assert_array_equal(b.take(np.arange(2000)).tokens,
                                  open_source("synth:2000:1").read_all().tokens)
    b.close()


def test_store_times_and_time_split_match_in_memory(tmp_path, shared_data):
    # A source with a time column (Avazu's hour): the store keeps every row's time, and a
    # streaming time split trains the same model as the in-memory one.
    path = shared_data / "avazu" / "train_9999.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    spec = f"avazu:{path}"
    ref = open_source(spec).read_all()
    store = EncodedStore.write(open_source(spec), tmp_path / "rows")
    np.testing.assert_array_equal(store.times(), ref.times)
    idx = np.random.default_rng(0).permutation(len(ref))[:500]
    np.testing.assert_array_equal(store.take(idx).times, ref.times[idx])
    store.close()
    kw = dict(data=spec, split="time", epochs=1, embedding="hash", compression=4)
    mem = train_model(_cfg(**kw))
    disk = train_model(_cfg(stream=True, work_dir=str(tmp_path / "w"), **kw))
    _same_models(mem, disk)
    assert mem.metrics["test_auc"] == disk.metrics["test_auc"]


def test_rowwise_adagrad_matches_its_definition():
    torch.manual_seed(0)
    w0 = torch.randn(10, 4)
    idx = torch.tensor([1, 3, 3, 7])
    g_rows = torch.randn(4, 4)
    # Sparse gradient with a repeated row, as nn.Embedding(sparse=True) makes it.
    p = torch.nn.Parameter(w0.clone())
    p.grad = torch.sparse_coo_tensor(idx[None], g_rows, (10, 4))
    opt = RowWiseAdagrad([p], lr=0.1, eps=1e-8)
    opt.step()
    dense_g = torch.zeros(10, 4).index_add_(0, idx, g_rows)
    acc = dense_g.pow(2).mean(1)
    want = w0 - 0.1 * dense_g / (acc.sqrt() + 1e-8)[:, None]
    touched = dense_g.abs().sum(1) > 0
    assert torch.allclose(p.data[touched], want[touched], atol=1e-6)
    assert torch.equal(p.data[~touched], w0[~touched])
    assert opt.state_bytes() == 10 * 4  # one float per row
    # The dense-gradient path gives the same step.
    q = torch.nn.Parameter(w0.clone())
    q.grad = dense_g.clone()
    RowWiseAdagrad([q], lr=0.1).step()
    assert torch.allclose(q.data[touched], p.data[touched], atol=1e-6)
    # A 1-D shared memory: one accumulator per float.
    m = torch.nn.Parameter(torch.zeros(6))
    m.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2, 2]]), torch.tensor([1.0, 2.0, 2.0]), (6,))
    o = RowWiseAdagrad([m], lr=1.0)
    o.step()
    assert torch.allclose(m.data, torch.tensor([-1.0, 0, -1.0, 0, 0, 0]))
    assert o.state_bytes() == 6 * 4


def test_rowwise_optimizer_trains_sparse_tables_as_well_as_adam():
    # Shared memories trained with sparse gradients: row-wise Adagrad (one state float per
    # float, not Adam's two) learns at least about as well on the synthetic signal.
    for kind in ("robez", "lma"):
        kw = dict(data="synth:6000:1", embedding=kind, compression=4, options={"sparse": True})
        adam = train_model(_cfg(**kw)).metrics
        rw = train_model(_cfg(optimizer="rowwise", **kw)).metrics
        assert rw["test_auc"] > 0.6
        assert rw["test_auc"] > adam["test_auc"] - 0.02, kind
        assert rw["optimizer_state_bytes"] < 0.6 * adam["optimizer_state_bytes"]


def test_encoded_rows_are_reused_only_for_the_same_source(tmp_path):
    a = EncodedStore.open_or_write(open_source("synth:2000:1"), tmp_path / "rows")
    mtime = (tmp_path / "rows" / "rows.bin").stat().st_mtime_ns
    a.close()
    b = EncodedStore.open_or_write(open_source("synth:2000:1"), tmp_path / "rows")
    assert (tmp_path / "rows" / "rows.bin").stat().st_mtime_ns == mtime and len(b) == 2000
    b.close()
    c = EncodedStore.open_or_write(open_source("synth:2500:1"), tmp_path / "rows")
    assert len(c) == 2500
    c.close()


def test_vocab_from_adds_a_value_set_to_the_vocabulary(tmp_path):
    from lma.data.synthetic import SynthConfig, value_set_feature_map

    value_set_feature_map(SynthConfig(seed=1), 200_000).save(tmp_path / "vs")
    plain = train_model(_cfg(epochs=1))
    wide = train_model(_cfg(epochs=1, stream=True, vocab_from=str(tmp_path / "vs")))
    assert wide.metrics["vocabulary"] > 2 * plain.metrics["vocabulary"]
    for f in range(26):  # every training token keeps its row
        assert np.isin(plain.feature_map.tokens[f], wide.feature_map.tokens[f]).all()
    assert wide.feature_map.meta["merged"]["untrained"]


def test_signature_sample_script_reports_a_trained_checkpoint(tmp_path):
    # scripts/signature_sample.py on a streaming run's rows: computed tables per sample size,
    # and with --checkpoints the trained run's own table beside its test AUC.
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work, out = tmp_path / "w", tmp_path / "lma"
    res = train_model(_cfg(embedding="lma", compression=4, options={"sample_rows": 1000},
                           stream=True, work_dir=str(work), out=str(out), epochs=1))
    script = [sys.executable, str(root / "scripts" / "signature_sample.py"), str(work),
              "--fractions", "0.8,0.1,0.1", "--seed", "0"]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    got = subprocess.run([*script, "--samples", "500,1000"], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    sizes = [json.loads(line) for line in got]
    assert [r["sample_rows"] for r in sizes] == [500, 1000]
    assert sizes[0]["signed_tokens"] < sizes[1]["signed_tokens"]
    assert 0 < sizes[0]["test_occurrences_covered"] < sizes[1]["test_occurrences_covered"] <= 1
    got = subprocess.run([*script, "--checkpoints", str(out)], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    (row,) = [json.loads(line) for line in got]
    assert row["sample_rows"] == 1000 and row["test_auc"] == res.metrics["test_auc"]
    # The trained table is the one computed from the same 1000-row sample.
    assert row["signed_tokens"] == sizes[1]["signed_tokens"]
    assert row["test_occurrences_covered"] == sizes[1]["test_occurrences_covered"]
