"""torch.profiler's operator table for one ``scripts/bench_model.py`` variant's torch program:
self CPU time per op over 40 calls of 1000 rows (one thread), after one warm pass.

    taskset -c 0 python scripts/profile_torch_program.py BENCH_OUT VARIANT
    # e.g. /tmp/bench_model lma16/hot
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main() -> int:
    import bench_model as bm
    from torch.profiler import ProfilerActivity, profile

    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, name = Path(sys.argv[1]), sys.argv[2]
    spec = json.loads((out / "results.json").read_text())["variants"][name]["spec"]
    fn, fmap = bm._engine_fn(out, name, spec, "torch", "model")
    batches = bm._batches(fmap, 1000, 1100)
    for b in batches:
        fn(b)
    calls = 40
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(calls):
            fn(batches[i % len(batches)])
    sys.stdout.write(f"{name} torch program, {calls} calls of 1000 rows:\n")
    sys.stdout.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
