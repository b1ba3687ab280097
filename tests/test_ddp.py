"""Data-parallel training (`torchrun ... lma.cli train --ddp`, gloo): two real processes give the
model single-process training gives, within floating-point tolerance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lma.checkpoint import load_checkpoint
from lma.train import TrainConfig, train_model
from tests.service_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None,
                    reason="torchrun is not installed")
@pytest.mark.parametrize("extra", [
    [],
    ["--embedding", "robez", "--compression", "4", "--option", "sparse=true",
     "--optimizer", "rowwise"],
])
def test_two_gloo_processes_match_single_process(tmp_path, extra):
    args = ["--data", "synth:3000:1", "--epochs", "2", "--batch-size", "256", "--threads", "1",
            *extra]
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lma.cli", "-q",
         "train", "--ddp", *args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads(run.stdout)
    assert ddp["world_size"] == 2
    kw = dict(data="synth:3000:1", epochs=2, batch_size=256, threads=1, progress=False)
    if extra:
        kw.update(embedding="robez", compression=4, options={"sparse": True}, optimizer="rowwise")
    single = train_model(TrainConfig(**kw))
    assert ddp["test_auc"] == pytest.approx(single.metrics["test_auc"], abs=2e-4)
    assert ddp["rows"] == single.metrics["rows"]
    got = load_checkpoint(out).model.state_dict()
    for k, v in single.model.state_dict().items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-4, rtol=1e-3), k
    _check_sync_bytes(ddp, single.model, extra)


def _check_sync_bytes(ddp: dict, model: torch.nn.Module, extra: list[str]) -> None:
    """The sync's byte counters against the model: the dense all-reduce is every non-sparse
    gradient float once per step; a sparse shared memory sends 4 bytes of int32 index and 4 of
    value per touched float, at most every float its rank's rows read; and what the process
    wrote to its sockets is that payload plus small per-collective headers (two ranks: a ring
    all-reduce and an all-gather each send one payload)."""
    info = ddp["ddp"]
    sparse = {id(p) for p in model.embedding.sparse_parameters()}
    dense_floats = sum(p.numel() for p in model.parameters() if id(p) not in sparse)
    assert info["dense_gradient_floats"] == dense_floats
    assert info["parameter_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    steps = 2 * -(-ddp["rows"]["train"] // 256)
    rows_per_rank = 128  # half of each 256-row batch
    for r in info["ranks"]:
        sync = r["sync"]
        assert sync["steps"] == steps
        assert sync["dense_bytes_per_step"] == 4 * dense_floats
        if extra:
            assert info["sparse_parameters"] == [[model.embedding.memory.numel()]]
            assert 0 < sync["sparse_entries_per_step"] <= rows_per_rank * 26 * 16
            assert sync["sparse_bytes_per_step"] == pytest.approx(8 * sync["sparse_entries_per_step"])
            assert sync["sparse_sent_bytes_per_step"] >= sync["sparse_bytes_per_step"]
        else:
            assert info["sparse_parameters"] == []
            assert sync["sparse_sent_bytes_per_step"] == 0
        if sync["wire_bytes_per_step"] is not None:
            payload = sync["dense_bytes_per_step"] + sync["sparse_sent_bytes_per_step"]
            assert payload <= sync["wire_bytes_per_step"] <= 1.02 * payload + 4096
