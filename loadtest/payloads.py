"""Realistic ranking requests for the load generators, in the service's three wire forms.

A ranking request is one page view: a context (the user and page fields) and N candidate ads
(the other fields). Both come from real rows (``criteo:PATH``, ``avazu:PATH``, ``table:PATH``) or
from lma's synthetic generator (``synth:ROWS[:SEED]``, Criteo schema): the context from one row,
the candidates from the next N rows, each cell holding the text the training file held. A set
share of the categorical cells (``unseen_rate``) is replaced by values no training file holds, so
the load exercises the fallback path of unseen tokens as production traffic does.

Wire forms (see service/ and docs/DEPLOY.md):

- ``v1``: ``POST /v1/models/{name}:predict`` with ``{"context", "candidates", "top_k"}``.
- ``v2-json``: ``POST /v2/models/{name}/infer``, one BYTES tensor of N values per raw field
  (context merged into each candidate; ``""`` is a missing value, as an empty CSV cell).
- ``v2-binary``: the same tensors in the binary tensor data extension (a JSON header of
  ``Inference-Header-Content-Length`` bytes, then each tensor's elements as a 4-byte
  little-endian length and the UTF-8 bytes), asking for the output in binary too.

Requests are built once into a pool of ready bodies so the generator spends its time sending.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROUTES = ("v1", "v2-json", "v2-binary")
DEFAULT_DATA = "synth:2000:1"
# The fields treated as the request's context when none are named: for the anonymised Criteo
# columns no split is documented, so the dense counts and the first categorical columns play the
# user and page; the rest vary per candidate ad.
DEFAULT_CONTEXT_CATEGORICAL = 8


@dataclass(frozen=True)
class RequestSpec:
    """What to send: data source, request shape, unseen-value rate, pool size."""

    data: str = DEFAULT_DATA
    candidates: int = 100
    unseen_rate: float = 0.05
    top_k: int | None = 10
    context_fields: tuple[str, ...] | None = None
    pool: int = 64
    seed: int = 0
    # Rows read from the source; by default enough for varied pools of any request size.
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            object.__setattr__(self, "rows", max(2000, 8 * self.candidates))
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if not 0.0 <= self.unseen_rate <= 1.0:
            raise ValueError(f"unseen_rate must be in [0, 1], got {self.unseen_rate}")
        if self.pool < 1 or self.rows < 1:
            raise ValueError("pool and rows must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")


@dataclass(frozen=True)
class Payload:
    """One ready request: where it goes, its body and headers, how many rows it scores."""

    route: str
    path: str
    body: bytes
    headers: dict[str, str]
    rows: int


@dataclass
class RequestSet:
    """Field names and raw rows of a source, and the request builder over them."""

    fields: list[str]
    categorical: set[str]
    context_fields: list[str]
    records: list[dict[str, Any]]
    spec: RequestSpec
    unseen_cells: int = field(default=0)
    cells: int = field(default=0)

    @property
    def candidate_fields(self) -> list[str]:
        ctx = set(self.context_fields)
        return [f for f in self.fields if f not in ctx]


def load_request_set(spec: RequestSpec) -> RequestSet:
    """Read ``spec.rows`` raw rows of ``spec.data`` (label dropped, missing cells left out)."""
    from lma.data.readers import open_source

    source = open_source(spec.data, chunk_rows=min(spec.rows, 65536))
    schema = source.schema
    skip = {schema.label} if schema.label else set()
    records: list[dict[str, Any]] = []
    names: list[str] = []
    for table, _enc in source.iter_tables():
        names = [n for n in table.schema.names if n not in skip]
        for row in table.select(names).to_pylist():
            records.append({k: v for k, v in row.items() if v is not None and v != ""})
            if len(records) >= spec.rows:
                break
        if len(records) >= spec.rows:
            break
    if not records:
        raise ValueError(f"{spec.data}: no rows")
    dense = {f.name for f in schema.dense}
    # Only the schema's own categorical fields get unseen values: a derived column's source (Avazu's
    # ``hour``) must stay well-formed.
    categorical = {f.name for f in schema.categorical} & set(names)
    if spec.context_fields is not None:
        unknown = [f for f in spec.context_fields if f not in names]
        if unknown:
            raise ValueError(f"context fields not in {spec.data}: {unknown}")
        context = list(spec.context_fields)
    else:
        cats = [n for n in names if n not in dense]
        context = [n for n in names if n in dense] + cats[:DEFAULT_CONTEXT_CATEGORICAL]
    return RequestSet(names, categorical, context, records, spec)


def _unseen(rng: np.random.Generator) -> str:
    # Training values are hex strings of 8 digits or decimal integers: this text is neither.
    return f"unseen-{int(rng.integers(0, 2**62)):x}"


def _mix_unseen(rs: RequestSet, rec: dict[str, Any], fields: Sequence[str], rng) -> dict:
    out = {}
    rate = rs.spec.unseen_rate
    for f in fields:
        if f not in rec:
            continue
        v = rec[f]
        if f in rs.categorical:
            rs.cells += 1
            if rate and rng.random() < rate:
                v = _unseen(rng)
                rs.unseen_cells += 1
        out[f] = v
    return out


def ranking_request(rs: RequestSet, i: int, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """The i-th request's context and candidates (rows taken in order, wrapping around)."""
    n = len(rs.records)
    start = (i * (rs.spec.candidates + 1)) % n
    context = _mix_unseen(rs, rs.records[start], rs.context_fields, rng)
    cand_fields = rs.candidate_fields
    candidates = [
        _mix_unseen(rs, rs.records[(start + 1 + j) % n], cand_fields, rng)
        for j in range(rs.spec.candidates)
    ]
    return context, candidates


def _text(v: Any) -> str:
    # The text the training file held; ints and floats as the CSV would spell them.
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _columns(rs: RequestSet, context: dict, candidates: list[dict]) -> dict[str, list[str]]:
    return {
        f: [
            _text(c[f]) if f in c else _text(context[f]) if f in context else "" for c in candidates
        ]
        for f in rs.fields
    }


def v1_body(rs: RequestSet, context: dict, candidates: list[dict]) -> bytes:
    body: dict[str, Any] = {"context": context, "candidates": candidates}
    if rs.spec.top_k is not None:
        body["top_k"] = min(rs.spec.top_k, len(candidates))
    return json.dumps(body, separators=(",", ":")).encode()


def v2_json_body(rs: RequestSet, context: dict, candidates: list[dict], rid: str) -> bytes:
    inputs = [
        {"name": f, "datatype": "BYTES", "shape": [len(vals)], "data": vals}
        for f, vals in _columns(rs, context, candidates).items()
    ]
    body = {"id": rid, "inputs": inputs, "outputs": [{"name": "probability"}]}
    return json.dumps(body, separators=(",", ":")).encode()


def encode_bytes_tensor(values: Sequence[str]) -> bytes:
    """The binary extension's BYTES layout: per element a uint32 LE length, then the bytes."""
    parts = []
    for v in values:
        b = v.encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def v2_binary_body(
    rs: RequestSet, context: dict, candidates: list[dict], rid: str
) -> tuple[bytes, int]:
    """(body, header length): JSON header then the tensors' bytes, output asked for in binary."""
    inputs, blobs = [], []
    for f, vals in _columns(rs, context, candidates).items():
        blob = encode_bytes_tensor(vals)
        blobs.append(blob)
        inputs.append(
            {
                "name": f,
                "datatype": "BYTES",
                "shape": [len(vals)],
                "parameters": {"binary_data_size": len(blob)},
            }
        )
    header = {
        "id": rid,
        "inputs": inputs,
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(blobs), len(head)


def route_path(route: str, model: str) -> str:
    if route == "v1":
        return f"/v1/models/{model}:predict"
    if route in ("v2-json", "v2-binary"):
        return f"/v2/models/{model}/infer"
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def build_payloads(rs: RequestSet, route: str, model: str) -> list[Payload]:
    """``spec.pool`` ready requests for one route (deterministic in ``spec.seed``)."""
    rng = np.random.default_rng(rs.spec.seed)
    path = route_path(route, model)
    out = []
    for i in range(rs.spec.pool):
        context, candidates = ranking_request(rs, i, rng)
        if route == "v1":
            body = v1_body(rs, context, candidates)
            headers = {"Content-Type": "application/json"}
        elif route == "v2-json":
            body = v2_json_body(rs, context, candidates, f"lt-{i}")
            headers = {"Content-Type": "application/json"}
        else:
            body, head_len = v2_binary_body(rs, context, candidates, f"lt-{i}")
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(head_len),
            }
        out.append(Payload(route, path, body, headers, len(candidates)))
    return out


def count_predictions(route: str, status: int, headers: Any, body: bytes) -> int:
    """How many scores an answer holds (-1: not a valid answer for ``route``)."""
    if status != 200:
        return -1
    try:
        if route == "v1":
            return len(json.loads(body)["predictions"])
        head_len = headers.get("Inference-Header-Content-Length") if headers else None
        if head_len is None:
            out = json.loads(body)["outputs"]
            return len(next(o for o in out if o["name"] == "probability")["data"])
        header = json.loads(body[: int(head_len)])
        (prob,) = [o for o in header["outputs"] if o["name"] == "probability"]
        size = int(prob["parameters"]["binary_data_size"])
        if len(body) - int(head_len) < size:
            return -1
        return size // 4  # FP32
    except (ValueError, KeyError, TypeError, StopIteration):
        return -1
