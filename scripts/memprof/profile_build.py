"""Peak memory of each piece of the full tables' construction (``FullTables.__init__`` in
lma/embeddings/tables.py, taken apart) on a saved feature map: the concatenation of the
fields' vocabularies, the argsort, the sorted copy, ``build_key_table`` over it, the
``nn.Embedding`` and the initialisation of its rows. Each line gives the RSS before the step,
the peak (VmHWM reset before it) and the RSS after it, each also as the increase over the RSS
before, in MiB, so that MiB per million tokens reads as (about) bytes per token.

    python scripts/memprof/profile_build.py FEATURE_MAP_DIR

FEATURE_MAP_DIR is any folder holding feature_map.json/.npz (an ``lma train --out`` folder, or
``lma data synth --feature-map --out``). docs/RESULTS.md "Full-table training peak at the
Kaggle vocabulary" ran it on the 4.84M-token map of a 4M-row run (``runs/streammem/new-4m``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _mem import Steps

from lma.embeddings.tables import _init_rows
from lma.features import FeatureMap
from lma.hashspec import build_key_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("feature_map_dir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = Steps(unit=1024.0, label="MiB")
    fmap = steps.run("load feature map", lambda: FeatureMap.load(args.feature_map_dir))
    n = sum(len(t) for t in fmap.tokens)
    print("tokens", n)
    vocab = steps.run("np.concatenate(feature_map.vocab(1))",
                      lambda: np.concatenate(fmap.vocab(1)))
    order = steps.run("argsort", lambda: np.argsort(vocab, kind="stable"))
    ordered = steps.run("vocab[order] (the sorted copy)",
                        lambda: np.ascontiguousarray(vocab[order]))
    kt = steps.run("build_key_table(sorted vocab, arange(n))",
                   lambda: build_key_table(ordered, np.arange(n)))
    print("key table MB", kt.rows.nbytes / 2**20)
    emb = steps.run("nn.Embedding(rows, 16, sparse=True)",
                    lambda: torch.nn.Embedding(n + len(fmap.tokens), 16, sparse=True))
    steps.run("_init_rows (uniform_)",
              lambda: _init_rows(emb.weight, torch.Generator().manual_seed(0)))


if __name__ == "__main__":
    main()
