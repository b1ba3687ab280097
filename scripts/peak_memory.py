"""Run a command and report its peak memory split into private and file-backed pages.

``ru_maxrss`` (and ``/usr/bin/time``'s "Maximum resident set size") count the pages of
memory-mapped files a process has touched, which for a job reading a multi-GB store is mostly
reclaimable page cache. This samples ``/proc/PID/status`` of the command every ``--interval``
seconds and prints, as one JSON line on stderr, the peaks of VmHWM, VmRSS, RssAnon (private
memory: what a memory limit has to hold) and RssFile.

    python scripts/peak_memory.py [--interval 0.2] -- COMMAND [ARGS...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak: dict[str, int] = {}
    while proc.poll() is None:
        for key, value in read_status(proc.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        time.sleep(args.interval)
    sys.stderr.write(json.dumps({"cmd": cmd, "rc": proc.returncode,
                                 "wall_s": round(time.time() - t0, 1),
                                 **{f"peak_{k}": v for k, v in peak.items()}}) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
