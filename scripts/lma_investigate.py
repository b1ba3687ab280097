"""LMA knobs on 1M synthetic rows, seed 0 (docs/RESULTS.md section 3): one run per spec.

    python scripts/lma_investigate.py '[["lma", 64, {"t": 4}], ["robez", 64, {}]]'
"""
import json
import sys

from lma.train import TrainConfig, load_splits, train_model

base = dict(data="synth:1000000:0", epochs=2, patience=1, threads=1, dim=16, batch_size=1024, lr=1e-3, interaction="dot-cat", progress=False)
splits, _ = load_splits(TrainConfig(**base))
for spec in json.loads(sys.argv[1]):
    kind, comp, opts = spec
    m = train_model(TrainConfig(**base, embedding=kind, compression=comp, options=opts), splits).metrics
    print(json.dumps({"kind": kind, "comp": comp, "opts": opts, "test_auc": round(m["test_auc"], 4), "emb_bytes": m["embedding_serving_bytes"]}), flush=True)
