"""Where the memory of full-table streaming training goes: the steps of ``lma train --stream
--embedding full [--vocab-from DIR]`` run one by one in this process, with the peak RSS of each
step (VmHWM reset before it through /proc/self/clear_refs), the RSS before and after it, and
its time; then a TSV of the same. The steps: split indices, the feature map of the training
rows, (with a value-set vocabulary) its load, the merge and freeing the inputs, ``build_model``
(key table and table), the optimizers, the epoch permutation, BATCHES training batches of 4096
rows and the evaluation of the validation rows. The configuration is that of the Kaggle-scale
runs of docs/RESULTS.md (row-wise Adagrad, batch 4096, one thread, 90/5/5 split).

    python scripts/memprof/profile_full.py WORK_DIR [--vocab-from VOCAB_DIR] [--batches 30] \\
        [--data synth:22300000:0:kaggle]

WORK_DIR is the ``--work-dir`` of a streaming run whose ``rows/`` store was encoded from
``--data``. docs/RESULTS.md "Full-table training peak at the Kaggle vocabulary" used
``WORK_DIR = runs/work-20m --vocab-from runs/kaggle-vocab --batches 30``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _mem import Steps

from lma.data import open_source
from lma.data.store import EncodedStore
from lma.features import FeatureMap
from lma.train import TrainConfig, _store_data, build_model, make_optimizers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--vocab-from", default=None, help="a value-set feature map to merge in")
    ap.add_argument("--batches", type=int, default=50, help="training batches to run")
    ap.add_argument("--data", default="synth:22300000:0:kaggle",
                    help="the source the store was encoded from")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(data=args.data, stream=True, fractions=(0.9, 0.05, 0.05),
                      vocab_from=args.vocab_from, epochs=1, optimizer="rowwise",
                      batch_size=4096, lr=2e-3, sparse_lr=0.1, threads=1, embedding="full",
                      progress=False)
    steps = Steps()
    store = steps.run("open store", lambda: EncodedStore(args.work_dir / "rows"))
    schema = open_source(cfg.data).schema
    data = steps.run("split indices", lambda: _store_data(cfg, store, schema))
    fmap = steps.run("feature map of the training rows",
                     lambda: FeatureMap.build(schema, data.train_chunks()))
    if args.vocab_from:
        extra = steps.run("load the value-set feature map",
                          lambda: FeatureMap.load(args.vocab_from))
        merged = steps.run("merge", lambda: fmap.merged(extra))
        del fmap, extra
        steps.run("free the two inputs", lambda: None)
    else:
        merged = fmap
        del fmap
    fmap_gb = sum(t.nbytes + c.nbytes for t, c in zip(merged.tokens, merged.counts, strict=True))
    print("tokens", sum(len(t) for t in merged.tokens), "feature map", fmap_gb / 2**30, "GiB")
    model = steps.run("build_model (key table, table init)",
                      lambda: build_model(cfg, merged, data.train_tokens))
    emb = model.embedding
    print("table GiB", emb.table.weight.numel() * 4 / 2**30,
          "state GiB", emb.state_bytes() / 2**30, flush=True)
    opts = steps.run("optimizers", lambda: make_optimizers(cfg, model))
    rows = data.train_rows(torch.device("cpu"))
    rng = np.random.default_rng(0)
    perm = steps.run("epoch permutation", lambda: rng.permutation(len(rows)))
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def train() -> None:
        model.train()
        for b in range(args.batches):
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            dense, tokens, labels = rows.batch(perm[sl], torch.from_numpy(perm[sl]))
            loss = loss_fn(model(dense, tokens), labels)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()

    steps.run(f"{args.batches} training batches", train)
    steps.run("evaluate val", lambda: data.evaluate(model, "val"))
    print("TSV (GiB)")
    print(steps.tsv())


if __name__ == "__main__":
    main()
