"""Shared by the memprof scripts: this process's RSS and peak, the resident pages of a mapped
file, and a step timer that resets the peak before each step (so each step's VmHWM is its
own)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def mapped_kib(pid: int | str, suffix: str) -> int:
    """Resident KiB of the mappings of process ``pid`` ("self" for this one) whose file path
    ends with ``suffix`` (from /proc/PID/smaps)."""
    total, current = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):
                # A mapping's header line: "start-end perms offset dev inode [path]".
                current = line.rstrip().endswith(suffix)
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Steps:
    """Runs named steps one by one and keeps (name, RSS before, peak, RSS after, seconds)."""

    unit: float = 1024.0 * 1024.0  # KiB per reported unit (default GiB)
    label: str = "GiB"
    rows: list[tuple[str, float, float, float, float]] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], T]) -> T:
        gc.collect()
        reset_peak()
        before = status_kib()["VmRSS"] / self.unit
        t = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t
        m = status_kib()
        peak, after = m["VmHWM"] / self.unit, m["VmRSS"] / self.unit
        self.rows.append((name, before, peak, after, sec))
        u = self.label
        print(f"{name:44s} before {before:8.2f} {u}  peak {peak:8.2f} {u} (+{peak - before:.2f})  "
              f"after {after:8.2f} {u} (+{after - before:.2f})  {sec:6.1f} s", flush=True)
        return out

    def tsv(self) -> str:
        lines = ["step\tbefore\tpeak\tafter\tseconds"]
        lines += ["\t".join([r[0]] + [f"{x:.2f}" for x in r[1:]]) for r in self.rows]
        return "\n".join(lines)
