"""Build and cache the C++ CPU kernels ahead of time: ``python -m lma.ops.build [--quiet]``.

Exits 0 when the extension builds and passes a smoke check against the reference, 1 otherwise
(the package still works then, with the pure-torch fallback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger("lma.ops.build")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quiet", action="store_true", help="only report failures")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import torch

    from lma.ops import _native
    from lma.ops.reference import HashedGatherConfig, slot_indices_torch

    t0 = time.perf_counter()
    try:
        ext = _native.build(verbose=args.verbose)
    except Exception as exc:  # noqa: BLE001
        logger.error("building the LMA C++ kernels failed: %s", exc)
        return 1
    cfg = HashedGatherConfig(dim=16, z=4, mode="lma", aligned=False, m=1 << 12)
    consts = cfg.param_tensors()
    keys = torch.randint(-(1 << 62), 1 << 62, (257,), dtype=torch.int64)
    got = ext.slot_indices(keys, *consts, cfg.m, cfg.z, True, False)
    want = slot_indices_torch(keys, consts, cfg)
    if not torch.equal(got, want):
        logger.error("the LMA C++ kernels built but disagree with the reference")
        return 1
    logger.info(
        "LMA C++ kernels ready in %s (%.1fs)", _native.build_dir(), time.perf_counter() - t0
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
