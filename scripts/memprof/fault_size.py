"""How much of a memory-mapped file one page fault brings into a process.

Maps FILE read-only, applies the given ``madvise`` advice (e.g. MADV_RANDOM, MADV_NOHUGEPAGE),
then, for 1, 1, 1, 10 and 100 random byte reads (the mapping dropped with MADV_DONTNEED before
each), prints the KiB of the file resident in this process (``/proc/self/smaps``). With 4 KiB
faults that is 4 KiB per read; on kernels that map whole large page-cache folios it is up to
2 MiB per read, which is why a memory-mapped store stayed resident in the trainer
(docs/RESULTS.md, "Peak memory against the row count", on the rows.bin of a 1M-row store).

    python scripts/memprof/fault_size.py FILE [MADV_RANDOM] [MADV_NOHUGEPAGE] ...
"""

from __future__ import annotations

import argparse
import mmap
import os

import numpy as np
from _mem import mapped_kib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("advice", nargs="*", help="mmap.MADV_* names applied to the whole mapping")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    fd = os.open(args.file, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mm, np.uint8)
    for name in args.advice:
        mm.madvise(getattr(mmap, name))
    real = os.path.realpath(args.file)
    rng = np.random.default_rng(args.seed)
    for k in (1, 1, 1, 10, 100):
        mm.madvise(mmap.MADV_DONTNEED)
        offsets = rng.integers(0, len(data), k)
        int(data[offsets].sum())  # touch the pages
        resident = mapped_kib("self", real)
        print(f"{args.advice} {k} reads -> {resident} KiB resident", flush=True)
    del data
    mm.close()
    os.close(fd)


if __name__ == "__main__":
    main()
