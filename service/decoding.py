"""Request bodies -> model inputs.

The path of a request's features: the body is read with a byte limit (:func:`read_body`), parsed
with orjson, its rows (v1 instances, ranking candidates merged with their context, or v2 raw
feature tensors) are checked for unknown field names, filled from a feature source when one is
configured (:class:`FeatureSource`, the seam of the Redis feature store), and encoded by
:func:`encode_rows` exactly as ``encode_table`` encodes the same rows read from a file. v2 tensor
inputs (``dense`` FP32 [B, n_dense], ``tokens`` INT64 [B, S]) skip encoding.

Every refusal is a :class:`service.errors.RequestError` naming the field and the row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import pyarrow as pa

from lma.records import EncodedRecords, RecordEncoder
from lma.schema import Schema
from service.errors import RequestError

MAX_REPORTED_ERRORS = 50


# ---------------------------------------------------------------- body


async def read_body(chunks: Any, content_length: str | None, limit: int) -> bytes:
    """The whole body from an async iterator of byte chunks, refusing (413) past ``limit`` bytes;
    counted on the stream, so chunked uploads without a Content-Length are held to it too."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"Content-Length {content_length!r} is not a number") from None
        if declared > limit:
            raise RequestError(
                413, f"the body is {declared} bytes; the limit is {limit} (LMA_SERVE_MAX_BODY_BYTES)",
                kind="body_too_large",
            )
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413, f"the body is larger than the limit of {limit} bytes (LMA_SERVE_MAX_BODY_BYTES)",
                kind="body_too_large",
            )
        parts.append(chunk)
    return b"".join(parts)


def parse_json(body: bytes, what: str = "the body") -> Any:
    if not body:
        raise RequestError(400, f"{what} is empty; send a JSON object", kind="malformed_json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"{what} is not valid JSON: {exc}", kind="malformed_json") from None


# ---------------------------------------------------------------- feature source seam


class FeatureSource(Protocol):
    """Fills fields that rows do not carry, by entity (:class:`service.feature_store.
    RedisFeatureSource` on Redis).

    ``entities`` is the request-level mapping (e.g. ``{"device_id": "a99f214a"}``) or None;
    ``row_entities`` one mapping (or None) per row, or None. Stored values go under the rows' own
    values (the request wins); one round trip for the whole request, never past ``until`` (the
    request's deadline, ``time.monotonic()``). Returns warnings to pass back in the answer."""

    async def fill(
        self,
        schema: Schema,
        rows: list[dict[str, Any]],
        entities: dict[str, Any] | None,
        row_entities: list[dict[str, Any] | None] | None,
        *,
        until: float | None = None,
    ) -> list[str]: ...

    async def status(self, probe: bool = False) -> dict[str, Any]: ...

    async def close(self) -> None: ...


ENTITIES = "entities"


def check_entity(value: Any, prefix: str = "", row: int | None = None) -> dict[str, Any]:
    """An ``entities`` object as a request sent it: a non-empty object of entity field name ->
    id (string or number; several fields make one compound key), or the 422 naming the field
    (``prefix`` locates it, e.g. ``candidates[3].``) and the row."""
    where = f"{prefix}{ENTITIES}"
    if not isinstance(value, dict) or not value:
        raise RequestError(422, f"{where} must be a non-empty object of entity field -> id, "
                           f"e.g. {{\"device_id\": \"a99f214a\"}}; got {value!r}"[:300],
                           field=ENTITIES, row=row, kind="bad_entity")
    for name, v in value.items():
        if not name or ":" in name or "," in name:
            raise RequestError(422, f"{where}: bad entity field name {name!r} (non-empty, no ':' "
                               "or ',')", field=f"{ENTITIES}.{name}", row=row, kind="bad_entity")
        reason = _bad_entity_id(v)
        if reason:
            raise RequestError(422, f"{where}.{name}: {reason}"[:300],
                               field=f"{ENTITIES}.{name}", row=row, kind="bad_entity")
    return value


def _bad_entity_id(v: Any) -> str | None:
    """Why ``v`` cannot be an entity id (None: it can): ids are keyed by the text
    :func:`lma.records.canonical_text` gives, so ``15706``, ``15706.0`` and ``"15706"`` agree."""
    from lma.records import canonical_text

    if not isinstance(v, str | int | float) or isinstance(v, bool):
        return f"an entity id must be a non-empty string or a number, got {v!r}"
    try:
        text = canonical_text(v)
    except ValueError as e:
        return f"{e} (got {v!r})"
    if not text:
        return "an entity id must not be empty"
    return None


FeatureSourceFactory = Callable[[], Awaitable[FeatureSource | None]]


# ---------------------------------------------------------------- rows -> arrays


@dataclass
class Rows:
    """Encoded rows for the model."""

    dense: np.ndarray  # (N, n_dense) float32
    tokens: np.ndarray  # (N, S) int64
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def encode_rows(encoder: RecordEncoder, rows: list[dict[str, Any]]) -> EncodedRecords:
    """JSON rows -> dense (N, n_dense) float32, tokens (N, S) int64, errors and unknown keys.

    The one place the service turns JSON values into model inputs (:mod:`lma.records`: the same
    numbers ``encode_table`` gives for the rows' training-file text; its canonicalisation rules)."""
    return encoder.encode(rows)


def _check(enc: EncodedRecords, where: str, ignore_unknown: bool) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of an encoding, or the 422 naming the first bad (row, field)."""
    if enc.unknown and not ignore_unknown:
        names = sorted({k for _, k in enc.unknown})
        listed = [{"row": r, "field": k, "reason": "unknown field name"}
                  for r, k in enc.unknown[:MAX_REPORTED_ERRORS]]
        r, k = enc.unknown[0]
        raise RequestError(
            422,
            f"{where}[{r}] has unknown field {k!r} ({len(names)} unknown name(s): {names[:10]}); "
            "the model's fields are its schema's dense and categorical names "
            "(LMA_SERVE_IGNORE_UNKNOWN=1 ignores others)",
            field=k, row=r, errors=listed, kind="unknown_field",
        )
    if enc.errors:
        errors = sorted(enc.errors, key=lambda e: (e.row, e.field or ""))
        listed = [{"row": e.row, "field": e.field, "reason": e.reason}
                  for e in errors[:MAX_REPORTED_ERRORS]]
        e = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RequestError(422, f"{where}[{e.row}].{e.field}: {e.reason}{more}",
                           field=e.field, row=e.row, errors=listed, kind="bad_value")
    return enc.dense, enc.tokens


def rows_to_arrays(encoder: RecordEncoder, rows: list[dict[str, Any]], where: str,
                   ignore_unknown: bool = False) -> tuple[np.ndarray, np.ndarray]:
    return _check(encode_rows(encoder, rows), where, ignore_unknown)


# ---------------------------------------------------------------- v1


@dataclass
class V1Request:
    rows: list[dict[str, Any]]
    ranking: bool
    top_k: int | None
    entities: dict[str, Any] | None
    where: str
    # Per row (instances[i].entities, candidates[i].entities), or None when no row names one.
    row_entities: list[dict[str, Any] | None] | None = None


def decode_v1(obj: Any, max_rows: int) -> V1Request:
    if not isinstance(obj, dict):
        raise RequestError(422, "the body must be a JSON object with 'instances' (or 'context' and "
                           "'candidates')", field="body", kind="bad_shape")
    entities = obj.get(ENTITIES)
    if entities is not None:
        check_entity(entities)
    if "instances" in obj:
        extra = set(obj) - {"instances", "entities"}
        if extra:
            raise RequestError(422, f"unknown top-level key(s) {sorted(extra)} beside 'instances'",
                               field=sorted(extra)[0], kind="unknown_field")
        rows = obj["instances"]
        where = "instances"
        ranking = False
        top_k = None
    elif "candidates" in obj:
        extra = set(obj) - {"context", "candidates", "top_k", "entities"}
        if extra:
            raise RequestError(422, f"unknown top-level key(s) {sorted(extra)} in a ranking request",
                               field=sorted(extra)[0], kind="unknown_field")
        rows = obj["candidates"]
        where = "candidates"
        ranking = True
        top_k = obj.get("top_k")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise RequestError(422, f"'top_k' must be a positive integer, got {top_k!r}", field="top_k")
    else:
        raise RequestError(422, "the body needs 'instances' (a list of rows) or 'candidates' "
                           "(with an optional 'context')", field="instances", kind="bad_shape")
    if not isinstance(rows, list):
        raise RequestError(422, f"'{where}' must be a list of objects", field=where, kind="bad_shape")
    if not rows:
        raise RequestError(422, f"'{where}' is empty; send at least one row", field=where,
                           kind="bad_shape")
    if len(rows) > max_rows:
        raise RequestError(413, f"{len(rows)} rows in '{where}'; the limit is {max_rows} per "
                           "request (LMA_SERVE_MAX_ROWS)", field=where, kind="too_many_rows")
    row_entities: list[dict[str, Any] | None] | None = None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise RequestError(422, f"{where}[{i}] must be an object of field name -> value",
                               field=where, row=i, kind="bad_shape")
        if ENTITIES in r:
            # "entities" is reserved in a row: the row's own entity, not a feature.
            if row_entities is None:
                row_entities = [None] * len(rows)
            row_entities[i] = check_entity(r.pop(ENTITIES), f"{where}[{i}].", i)
    if ranking:
        ctx = obj.get("context")
        if ctx is not None:
            if not isinstance(ctx, dict):
                raise RequestError(422, "'context' must be an object of field name -> value",
                                   field="context", kind="bad_shape")
            if ENTITIES in ctx:
                raise RequestError(422, "context.entities: the request's entities go at the top "
                                   "level ('entities' beside 'context'), a candidate's in the "
                                   "candidate", field="context.entities", kind="bad_entity")
            if ctx:
                rows = [{**ctx, **r} for r in rows]  # candidate values win
    return V1Request(rows, ranking, top_k, entities, where, row_entities)


def top_k_of(probabilities: np.ndarray, k: int) -> dict[str, list[Any]]:
    k = min(k, len(probabilities))
    # Stable order: equal scores keep the candidates' order.
    order = np.argsort(-probabilities, kind="stable")[:k]
    return {"indices": order.tolist(), "scores": probabilities[order].tolist()}


# ---------------------------------------------------------------- v2 (Open Inference Protocol)

V2_DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": None,
}
V2_OUTPUTS = ("probability", "logits")


@dataclass
class V2Request:
    id: str | None
    tensors: dict[str, np.ndarray | pa.Array | list[Any]]  # numbers; BYTES: strings
    batch: int
    outputs: list[str]
    binary_outputs: set[str]
    timeout_ms: float | None
    entities: dict[str, Any] | None = None  # parameters.entities: for every row
    entity_inputs: list[str] | None = None  # parameters.entity_inputs: per-row entity tensors


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a v2 body (binary tensor data extension)."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a "
                           "number", field="Inference-Header-Content-Length") from None
    if n < 0 or n > len(body):
        raise RequestError(400, f"Inference-Header-Content-Length is {n} but the body has "
                           f"{len(body)} bytes", field="Inference-Header-Content-Length")
    return body[:n], body[n:]


def _bytes_elements(raw: bytes, count: int, name: str, max_len: int) -> pa.Array:
    """A binary BYTES tensor (each element a uint32 little-endian length, then its bytes) as a
    UTF-8 string array; only the length prefixes are read in Python, the bytes are moved and
    checked by numpy and Arrow."""
    n = len(raw)
    lens = np.empty(count, np.int64)
    pos = 0
    first = int.from_bytes(raw[:4], "little") if n >= 4 else -1
    if count and first >= 0 and n == count * (4 + first):
        # Every element as long as the first (ids of one width, no missing cells): check the
        # prefixes at once instead of walking them.
        prefixes = np.frombuffer(raw, np.uint8).reshape(count, 4 + first)[:, :4]
        if (np.ascontiguousarray(prefixes).view("<u4").ravel() == first).all():
            lens[:] = first
            pos = n
            count_walked = 0
        else:
            count_walked = count
    else:
        count_walked = count
    for i in range(count_walked):
        if pos + 4 > n:
            raise RequestError(400, f"input {name!r}: BYTES element {i} is cut off (its 4-byte "
                               "length prefix is missing)", field=name, row=i)
        ln = int.from_bytes(raw[pos:pos + 4], "little")
        lens[i] = ln
        pos += 4 + ln
        if pos > n:
            raise RequestError(400, f"input {name!r}: BYTES element {i} says {ln} bytes but "
                               f"only {n - pos + ln} remain", field=name, row=i)
    if pos != n:
        raise RequestError(400, f"input {name!r}: {n - pos} bytes left after {count} "
                           "BYTES elements (binary_data_size disagrees with the shape)", field=name)
    if count and lens.max() > max_len:
        i = int(np.flatnonzero(lens > max_len)[0])
        raise RequestError(422, f"input {name!r}: element {i} is longer than {max_len} bytes "
                           "(LMA_SERVE_MAX_STRING_BYTES)", field=name, row=i)
    buf = np.frombuffer(raw, np.uint8)
    keep = np.ones(n, bool)
    # Element i's prefix starts at 4 i + (bytes of the elements before it).
    starts = 4 * np.arange(count, dtype=np.int64) + np.concatenate(([0], np.cumsum(lens)[:-1]))
    for k in range(4):
        keep[starts + k] = False
    offsets = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    arr = pa.Array.from_buffers(pa.large_string(), count,
                                [None, pa.py_buffer(offsets), pa.py_buffer(buf[keep])])
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        bad = next(i for i, v in enumerate(pa.Array.from_buffers(
            pa.large_binary(), count, arr.buffers()).to_pylist()) if not _utf8(v))
        raise RequestError(400, f"input {name!r}: element {bad} is not UTF-8", field=name,
                           row=bad) from None
    return arr


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def decode_v2(header: bytes, tail: bytes, max_rows: int, max_len: int) -> V2Request:
    obj = parse_json(header, "the inference request header")
    if not isinstance(obj, dict):
        raise RequestError(400, "the inference request must be a JSON object", field="body")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError(400, "'id' must be a string", field="id")
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, "'parameters' must be an object", field="parameters")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "'inputs' must be a non-empty list of tensors", field="inputs")
    tensors: dict[str, np.ndarray | pa.Array | list[Any]] = {}
    offset = 0
    batch: int | None = None
    for k, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise RequestError(400, f"inputs[{k}] must be an object", field=f"inputs[{k}]")
        name, shape, dtype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"inputs[{k}] has no 'name'", field=f"inputs[{k}]")
        if name in tensors:
            raise RequestError(400, f"input {name!r} is given twice", field=name)
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise RequestError(400, f"input {name!r}: 'shape' must be [B] or [B, W] with "
                               f"non-negative integers, got {shape!r}", field=name)
        if dtype not in V2_DTYPES:
            raise RequestError(400, f"input {name!r}: unknown datatype {dtype!r} (one of "
                               f"{sorted(V2_DTYPES)})", field=name)
        count = int(np.prod(shape))
        if shape[0] > max_rows:
            raise RequestError(413, f"input {name!r} has {shape[0]} rows; the limit is "
                               f"{max_rows} (LMA_SERVE_MAX_ROWS)", field=name, kind="too_many_rows")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise RequestError(400, f"input {name!r} has {shape[0]} rows, an earlier input "
                               f"{batch}: every input needs the same first dimension", field=name)
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise RequestError(400, f"input {name!r}: 'parameters' must be an object", field=name)
        size = tparams.get("binary_data_size")
        np_dtype = V2_DTYPES[dtype]
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise RequestError(400, f"input {name!r}: binary_data_size must be a "
                                   "non-negative integer", field=name)
            if "data" in t:
                raise RequestError(400, f"input {name!r} has both 'data' and binary_data_size",
                                   field=name)
            if offset + size > len(tail):
                raise RequestError(400, f"input {name!r}: binary_data_size {size} goes past the "
                                   f"end of the body ({len(tail) - offset} binary bytes left)",
                                   field=name)
            raw = tail[offset:offset + size]
            offset += size
            if np_dtype is None:
                value: np.ndarray | pa.Array | list[Any] = _bytes_elements(raw, count, name, max_len)
            else:
                if size != count * np_dtype.itemsize:
                    raise RequestError(400, f"input {name!r}: binary_data_size {size} is not "
                                       f"{count} x {np_dtype.itemsize} bytes for shape {shape} "
                                       f"{dtype}", field=name)
                value = np.frombuffer(raw, np_dtype).reshape(shape)
        else:
            if "data" not in t:
                raise RequestError(400, f"input {name!r} has neither 'data' nor binary_data_size",
                                   field=name)
            value = _json_tensor(name, t["data"], shape, count, dtype, np_dtype, max_len)
        tensors[name] = value
    if offset != len(tail):
        raise RequestError(400, f"{len(tail) - offset} binary bytes after the last input: the "
                           "binary_data_size values disagree with the body",
                           field="Inference-Header-Content-Length")
    assert batch is not None
    outputs, binary = _requested_outputs(obj, params)
    timeout = params.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not timeout > 0):
        raise RequestError(400, "parameters.timeout_ms must be a positive number",
                           field="parameters.timeout_ms")
    entities = params.get(ENTITIES)
    if entities is not None:
        check_entity(entities, "parameters.")
    entity_inputs = params.get("entity_inputs")
    if entity_inputs is not None:
        if (not isinstance(entity_inputs, list) or not entity_inputs
                or not all(isinstance(n, str) for n in entity_inputs)):
            raise RequestError(400, "parameters.entity_inputs must be a non-empty list of input "
                               "names", field="parameters.entity_inputs")
        for n in entity_inputs:
            if n not in tensors:
                raise RequestError(400, f"parameters.entity_inputs names {n!r}, which is not an "
                                   f"input (inputs: {sorted(tensors)})",
                                   field="parameters.entity_inputs")
            if not n or ":" in n or "," in n:
                raise RequestError(400, f"parameters.entity_inputs: bad entity field name {n!r}",
                                   field="parameters.entity_inputs")
    return V2Request(rid, tensors, batch, outputs, binary, timeout, entities, entity_inputs)


def _json_tensor(name: str, data: Any, shape: list[int], count: int, dtype: str,
                 np_dtype: np.dtype | None, max_len: int) -> np.ndarray | list[Any]:
    if not isinstance(data, list):
        raise RequestError(400, f"input {name!r}: 'data' must be a list", field=name)
    if np_dtype is None:
        flat = data
        if flat and isinstance(flat[0], list):
            flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
        if len(flat) != count:
            raise RequestError(400, f"input {name!r}: {len(flat)} values for shape {shape}",
                               field=name)
        for i, v in enumerate(flat):
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise RequestError(422, f"input {name!r}: element {i} of a BYTES tensor must be "
                                   "a string", field=name, row=i // max(1, count // max(shape[0], 1)))
            if isinstance(v, str) and len(v.encode("utf-8")) > max_len:
                raise RequestError(422, f"input {name!r}: element {i} is longer than {max_len} "
                                   "bytes (LMA_SERVE_MAX_STRING_BYTES)", field=name, row=i)
        return flat
    try:
        arr = np.asarray(data, dtype=np.float64 if np_dtype.kind == "f" else None)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(400, f"input {name!r}: 'data' is not a rectangular list of numbers",
                           field=name) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise RequestError(400, f"input {name!r}: 'data' holds non-numeric values for datatype "
                           f"{dtype}", field=name)
    if arr.size != count:
        raise RequestError(400, f"input {name!r}: {arr.size} values for shape {shape}", field=name)
    if np_dtype.kind in "iu" and arr.dtype.kind == "f":
        raise RequestError(400, f"input {name!r}: non-integer values for datatype {dtype}",
                           field=name)
    try:
        with np.errstate(over="raise", invalid="raise"):
            out = arr.astype(np_dtype) if np_dtype.kind != "b" else arr.astype(bool)
    except (FloatingPointError, OverflowError):
        raise RequestError(400, f"input {name!r}: values out of range for {dtype}", field=name) \
            from None
    if np_dtype.kind in "iu" and not np.array_equal(out.astype(arr.dtype), arr):
        raise RequestError(400, f"input {name!r}: values out of range for {dtype}", field=name)
    return out.reshape(shape)


def _requested_outputs(obj: dict[str, Any], params: dict[str, Any]) -> tuple[list[str], set[str]]:
    all_binary = bool(params.get("binary_data_output", False))
    req = obj.get("outputs")
    if req is None:
        names = ["probability"]
        return names, set(names) if all_binary else set()
    if not isinstance(req, list):
        raise RequestError(400, "'outputs' must be a list", field="outputs")
    names, binary = [], set()
    for k, o in enumerate(req):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RequestError(400, f"outputs[{k}] must be an object with a 'name'",
                               field=f"outputs[{k}]")
        if o["name"] not in V2_OUTPUTS:
            raise RequestError(400, f"unknown output {o['name']!r}; this model has "
                               f"{list(V2_OUTPUTS)}", field=f"outputs[{k}]")
        p = o.get("parameters") or {}
        names.append(o["name"])
        if all_binary or (isinstance(p, dict) and p.get("binary_data")):
            binary.add(o["name"])
    return names or ["probability"], binary


async def fill_v2(source: FeatureSource, schema: Schema, req: V2Request,
                  until: float | None) -> list[str]:
    """Add the stored fields of the request's entities to its raw feature tensors, in place.

    ``parameters.entities`` names one entity for every row; ``parameters.entity_inputs`` names
    input tensors whose values are each row's entity (a row with an empty value has none). An
    entity input that is not a model field is a key only and leaves the inputs. Tensors the
    request sends are its values for every row; stored fields fill only fields it does not send.
    """
    if {"dense", "tokens"} & set(req.tensors):
        raise RequestError(422, "entities need raw feature inputs (one tensor per field), not "
                           "the encoded 'dense'/'tokens'", field="parameters.entities",
                           kind="bad_entity")
    n = req.batch
    row_entities: list[dict[str, Any] | None] | None = None
    if req.entity_inputs:
        cols = {name: _as_list(req.tensors[name]) for name in req.entity_inputs}
        row_entities = []
        for i in range(n):
            ent = {name: c[i] for name, c in cols.items()}
            if any(v is None or v == "" for v in ent.values()):
                row_entities.append(None)
                continue
            for name, v in ent.items():
                reason = _bad_entity_id(v)
                if reason:
                    raise RequestError(422, f"input {name!r} (an entity input), row {i}: "
                                       f"{reason}"[:300], field=name, row=i, kind="bad_entity")
            row_entities.append(ent)
        known = set(schema.dense_names) | set(schema.categorical_names)
        for name in req.entity_inputs:
            if name not in known:
                del req.tensors[name]
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    warnings = await source.fill(schema, rows, req.entities, row_entities, until=until)
    sent = set(req.tensors)
    fields = {k for r in rows for k in r} - sent
    for k in sorted(fields):
        req.tensors[k] = [r.get(k) for r in rows]
    return warnings


def _as_list(v: np.ndarray | pa.Array | list[Any]) -> list[Any]:
    if isinstance(v, np.ndarray):
        return v.reshape(-1).tolist()
    if isinstance(v, pa.Array):
        return v.to_pylist()
    return list(v)


def v2_to_arrays(req: V2Request, encoder: RecordEncoder,
                 ignore_unknown: bool) -> tuple[np.ndarray, np.ndarray]:
    """The request's tensors as (dense, tokens): given directly, or raw feature tensors encoded."""
    names = set(req.tensors)
    schema = encoder.schema
    n_dense, n_slots = len(schema.dense), schema.n_token_slots
    if names & {"dense", "tokens"}:
        if names != {"dense", "tokens"} and not (n_dense == 0 and names == {"tokens"}):
            raise RequestError(400, "encoded inputs are exactly 'dense' (FP32 [B, n_dense]) and "
                               f"'tokens' (INT64 [B, S]); got {sorted(names)}", field="inputs")
        tokens = req.tensors["tokens"]
        dense = req.tensors.get("dense", np.zeros((req.batch, 0), np.float32))
        for nm, arr, width, dt in (("dense", dense, n_dense, np.float32),
                                   ("tokens", tokens, n_slots, np.int64)):
            if not isinstance(arr, np.ndarray) or arr.dtype != dt:
                want = "FP32" if dt is np.float32 else "INT64"
                raise RequestError(400, f"input {nm!r} must be datatype {want}", field=nm)
            if arr.ndim != 2 or arr.shape[1] != width:
                raise RequestError(400, f"input {nm!r} must have shape [B, {width}], got "
                                   f"{list(arr.shape)}", field=nm)
        bad = ~np.isfinite(dense)
        if bad.any():
            r = int(np.flatnonzero(bad.any(axis=1))[0])
            raise RequestError(400, f"input 'dense' row {r} holds a NaN or infinite value",
                               field="dense", row=r)
        return np.ascontiguousarray(dense), np.ascontiguousarray(tokens)
    cols: dict[str, Any] = {}
    for nm, v in req.tensors.items():
        if isinstance(v, np.ndarray):
            if v.ndim == 2 and v.shape[1] != 1:
                raise RequestError(400, f"input {nm!r}: a feature tensor must be [B] or [B, 1], "
                                   f"got {list(v.shape)}", field=nm)
            if v.dtype.kind == "b":
                raise RequestError(400, f"input {nm!r}: BOOL is not a feature datatype", field=nm)
            cols[nm] = v.reshape(-1)
        else:
            if len(v) != req.batch:
                raise RequestError(400, f"input {nm!r}: a feature tensor must be [B] or [B, 1] "
                                   f"({len(v)} values for {req.batch} rows)", field=nm)
            cols[nm] = v
    return _check(encoder.encode_columns(cols, req.batch), "row", ignore_unknown)
