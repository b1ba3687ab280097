"""``lma data stats``: one streaming pass of summary statistics over a data source."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from lma.data.base import DataSource
from lma.features import Encoded, FeatureMap, raw_dense, split_bag
from lma.tokens import token_hash


def dataset_stats(source: DataSource) -> dict[str, Any]:
    """Rows, label rate, per-field distinct values and missing rate, dense min/max/missing rate,
    and the bad lines met (with ``on_error="skip"``; ``"fail"`` raises on the first)."""
    schema = source.schema
    n_dense = len(schema.dense)
    cats = schema.categorical
    slot0 = np.cumsum([0] + [f.width for f in cats])[:-1]
    missing_tok = np.array([token_hash(f.name, None) for f in cats], dtype=np.int64)
    state: dict[str, Any] = {
        "rows": 0,
        "positives": 0.0,
        "labelled": False,
        "dmin": np.full(n_dense, np.inf),
        "dmax": np.full(n_dense, -np.inf),
        "dmiss": np.zeros(n_dense, np.int64),
        "cmiss": np.zeros(len(cats), np.int64),
        "truncated": np.zeros(len(cats), np.int64),
    }

    def chunks() -> Iterator[Encoded]:
        for table, enc in source.iter_tables():
            state["rows"] += len(enc)
            if enc.labels is not None:
                state["labelled"] = True
                state["positives"] += float(enc.labels.sum())
            if n_dense:
                raw = raw_dense(schema, table)
                miss = np.isnan(raw)
                state["dmiss"] += miss.sum(axis=0)
                state["dmin"] = np.fmin(state["dmin"], np.nanmin(np.where(miss, np.inf, raw), 0))
                state["dmax"] = np.fmax(state["dmax"], np.nanmax(np.where(miss, -np.inf, raw), 0))
            state["cmiss"] += (enc.tokens[:, slot0] == missing_tok[None, :]).sum(axis=0)
            for i, f in enumerate(cats):
                if f.separator is not None and f.name in table.column_names:
                    _, parent, pos = split_bag(f, table.column(f.name).combine_chunks())
                    state["truncated"][i] += len(np.unique(parent[pos >= f.max_values]))
            yield enc

    fmap = FeatureMap.build(schema, chunks())
    rows = state["rows"]

    def rate(k: float) -> float | None:
        return round(float(k) / rows, 6) if rows else None

    fields: dict[str, Any] = {}
    for i, f in enumerate(cats):
        toks = fmap.tokens[i]
        entry: dict[str, Any] = {
            "distinct": int(len(toks) - np.isin(missing_tok[i], toks)),
            "missing_rate": rate(state["cmiss"][i]),
        }
        if f.separator is not None:
            entry["max_values"] = f.max_values
            entry["rows_truncated"] = int(state["truncated"][i])
        fields[f.name] = entry
    dense: dict[str, Any] = {}
    for j, f in enumerate(schema.dense):
        seen = rows - int(state["dmiss"][j])
        dense[f.name] = {
            "min": float(state["dmin"][j]) if seen else None,
            "max": float(state["dmax"][j]) if seen else None,
            "missing_rate": rate(state["dmiss"][j]),
        }
    return {
        "source": source.name,
        "schema": schema.name,
        "rows": rows,
        "label_rate": rate(state["positives"]) if state["labelled"] else None,
        "distinct_total": int(sum(e["distinct"] for e in fields.values())),
        "categorical": fields,
        "dense": dense,
        "bad_lines": source.errors.to_dict(),
    }
