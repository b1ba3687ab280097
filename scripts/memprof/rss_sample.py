"""Run a command and record its memory over time: one TSV line every ``--interval`` seconds.

Each line holds the seconds since the start and, from ``/proc/PID/status``, VmRSS, RssAnon
(private memory), RssFile (file-backed pages) and VmHWM (the peak so far), plus, from
``/proc/PID/smaps``, the resident pages of the mappings whose path ends with
``--mapped-suffix`` (default ``rows.bin``: the encoded store of ``lma train --stream``), all in
MiB. That last column is what showed the memory-mapped store staying resident in the trainer
(docs/RESULTS.md, "Peak memory against the row count"). The command's own exit status is
returned. Only the command's own process is sampled (not its children): run the trainer
directly, e.g.

    /usr/bin/time -v python scripts/memprof/rss_sample.py --out RUN.rss.tsv --interval 0.5 -- \\
        lma train --data synth:1000000:0:kaggle --stream --work-dir W ... --out RUN

``scripts/memprof/summarize_rss.py RUN`` turns the samples and RUN/metrics.json into a table
row. (``scripts/peak_memory.py`` reports only the peaks, of a whole command tree.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import TextIO

from _mem import mapped_kib

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
HEADER = "t\tVmRSS_MB\tRssAnon_MB\tRssFile_MB\tmapped_MB\tVmHWM_MB\n"


def read_status(pid: int) -> dict[str, int]:
    """The fields of STATUS_FIELDS from /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0])
    return out


def sample(proc: subprocess.Popen[bytes], log: TextIO, interval: float, suffix: str) -> None:
    """Write one line per interval until the process exits (or its /proc entry goes)."""
    t0 = time.time()
    log.write(HEADER)
    while proc.poll() is None:
        try:
            s = read_status(proc.pid)
            m = mapped_kib(proc.pid, suffix)
        except (OSError, ValueError):
            break
        cols = [s.get(k, 0) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")]
        cols += [m / 1024, s.get("VmHWM", 0) / 1024]
        log.write(f"{time.time() - t0:.1f}\t" + "\t".join(f"{c:.0f}" for c in cols) + "\n")
        log.flush()
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: rss_sample.py --out TSV [--interval S] [--mapped-suffix S] -- COMMAND ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="TSV file to write")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--mapped-suffix", default="rows.bin",
                    help="count the resident pages of mapped files whose path ends so")
    args = ap.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    if not cmd:
        ap.error("no command after --")
    proc = subprocess.Popen(cmd)
    with open(args.out, "w") as log:
        sample(proc, log, args.interval, args.mapped_suffix)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
