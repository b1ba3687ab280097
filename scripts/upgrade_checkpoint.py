"""Store the key tables in a checkpoint written before they were stored, so that loading it
(export, evaluation) takes them instead of building them every time.

    python scripts/upgrade_checkpoint.py CHECKPOINT [--out DIR]

Without ``--out`` the checkpoint's ``checkpoint.pt`` is replaced (by a rename, so a process
that has it loaded keeps its weights); the build costs what it cost at training once more.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from lma.checkpoint import upgrade_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--out", help="write the upgraded checkpoint here instead")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = upgrade_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - t0, 1),
                      "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
