"""Request encoding cost: encode_table (the old path) against lma.records, for 1, 100, 1000 rows.

    flock /tmp/lma-bigjob.lock python scripts/bench_encode.py [--cpu N] [--seconds 1.5]

Rows are the first 1000 of the real Criteo and Avazu samples (``$LMA_SHARED_DATA``, else
``../shared/data``), sent as a client would ("JSON values": integer columns as JSON numbers, the
rest as strings, empty cells left out), or every value as the file's text ("text values"). The
old path is timed twice: ``encode_table`` alone on a ready-made table of the rows' text, and with
the table built from the text records first (what a server had to do before lma.records). ``encode_table`` is timed on a ready-made
table of the same rows' text (so it is charged nothing for building it). One thread, pinned to
one core. Prints a markdown table of medians (and fastest calls) in milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from lma.data import data_root, open_source  # noqa: E402
from lma.features import encode_table  # noqa: E402
from lma.records import encoder_for  # noqa: E402
from lma.schema import Schema, avazu_schema, criteo_schema  # noqa: E402

SIZES = (1, 100, 1000)


def _timeit(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Median and fastest of one call, in ms, over about ``seconds`` of calls (at least 20): on a
    shared machine the fastest is what the code costs, the median what a request met."""
    fn()
    times = []
    end = time.perf_counter() + seconds
    while len(times) < 20 or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    a = np.array(times) * 1e3
    return float(np.median(a)), float(a.min())


def _is_int(v: str) -> bool:
    return v.lstrip("-").isdigit() and str(int(v)) == v


def _load(spec: str, schema: Schema) -> tuple[pa.Table, list[dict[str, object]]]:
    """The first rows as a client sends them: a column whose every value is an integer as JSON
    numbers, other columns as strings, empty cells left out."""
    table, _ = next(open_source(spec, chunk_rows=max(SIZES)).iter_tables())
    numeric = {
        c
        for c in table.column_names
        if all(v == "" or _is_int(v) for v in table.column(c).to_pylist())
    }
    rows = [
        {k: int(v) if k in numeric else v for k, v in r.items() if v != "" and k != schema.label}
        for r in table.to_pylist()
    ]
    return table, json.loads(json.dumps(rows))


def _old_path(schema: Schema, rows: list[dict[str, str]], types: pa.Schema) -> object:
    return encode_table(schema, pa.Table.from_pylist(rows, schema=types))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last)")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per measurement")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[-1]
    os.sched_setaffinity(0, {cpu})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    root = data_root()
    sets = [
        ("criteo", f"criteo:{root / 'criteo' / 'train_10k.tsv'}", criteo_schema()),
        ("avazu", f"avazu:{root / 'avazu' / 'train_9999.csv'}", avazu_schema()),
    ]
    print(
        f"Request encoding, median (fastest) ms per call; 1 thread pinned to cpu {cpu}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"numpy {np.__version__}, pyarrow {pa.__version__}; data {root}"
    )
    print()
    print(
        "| data | rows | encode_table (old) | records -> table -> encode_table (old) | "
        "encode_records, JSON values | "
        "encode_records, text values | encode_columns, JSON values | speed-up (JSON) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, spec, schema in sets:
        table, rows = _load(spec, schema)
        text_rows = [{k: v for k, v in r.items() if k != schema.label} for r in table.to_pylist()]
        enc = encoder_for(schema)
        types = pa.schema([(c, pa.string()) for c in table.column_names if c != schema.label])
        for n in SIZES:
            t = table.slice(0, n)
            rec, txt = rows[:n], text_rows[:n]
            cols = {k: [r.get(k) for r in rec] for k in table.column_names}
            check = enc.encode(rec)
            ref = encode_table(schema, t)
            if check.errors or not np.array_equal(check.tokens, ref.tokens):
                raise SystemExit(f"{name}: encode_records differs from encode_table")
            old = _timeit(partial(encode_table, schema, t), args.seconds)
            old_rec = _timeit(partial(_old_path, schema, txt, types), args.seconds)
            new = _timeit(partial(enc.encode, rec), args.seconds)
            new_txt = _timeit(partial(enc.encode, txt), args.seconds)
            new_col = _timeit(partial(enc.encode_columns, cols, n), args.seconds)
            cells = [f"{m:.3f} ({p:.3f})" for m, p in (old, old_rec, new, new_txt, new_col)]
            print(f"| {name} | {n} | " + " | ".join(cells) + f" | {old[0] / new[0]:.0f}x |")


if __name__ == "__main__":
    main()
