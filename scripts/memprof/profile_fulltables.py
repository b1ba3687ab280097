"""Peak memory of ``FullTables.build`` as a whole on a saved feature map (VmHWM reset before
it), the RSS it keeps, and a sha256 of the built state dict and key-table buffers: two
versions of the construction that print the same checksum built the same table and weights.

    python scripts/memprof/profile_fulltables.py FEATURE_MAP_DIR

Run it from checkouts of the commits to compare (``PYTHONPATH=CHECKOUT``); docs/RESULTS.md
"Full-table training peak at the Kaggle vocabulary" compares three on the 4.84M-token map of
``runs/streammem/new-4m``. Memory in MB (10^6 bytes).
"""

from __future__ import annotations

import argparse
import hashlib

from _mem import reset_peak, status_kib

from lma.embeddings.base import EmbeddingSpec
from lma.embeddings.tables import FullTables
from lma.features import FeatureMap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("feature_map_dir")
    args = ap.parse_args()
    fmap = FeatureMap.load(args.feature_map_dir)
    n = fmap.full_table_rows(1)
    reset_peak()
    before = status_kib()["VmRSS"] * 1024 / 1e6
    emb = FullTables.build(EmbeddingSpec(kind="full", dim=16, n_params=n * 16), fmap)
    m = status_kib()
    h = hashlib.sha256()
    for k, v in emb.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    if emb.key_table is not None:
        # Also the key table's buffers, in case a version keeps them out of the state dict.
        for k, v in emb.key_table.named_buffers():
            h.update(k.encode())
            h.update(v.numpy().tobytes())
    print(f"rows {n}: peak +{m['VmHWM'] * 1024 / 1e6 - before:.0f} MB, "
          f"after +{m['VmRSS'] * 1024 / 1e6 - before:.0f} MB, sha256 {h.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
