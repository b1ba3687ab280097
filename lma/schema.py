"""Dataset schemas: which columns are the label, dense features and categorical fields.

A schema is the one description of a dataset shared by readers, training, export and serving.
Users describe their own CSV/Parquet files with a small JSON (or YAML) file; Criteo and Avazu have
built-in schemas. Dense transforms are applied in this order: missing -> 0 (or ``fill``), clip to
``[clip_min, clip_max]``, then ``log1p`` of the (non-negative) value when ``transform == 'log1p'``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

DenseTransform = Literal["identity", "log1p"]


@dataclass(frozen=True)
class DenseField:
    name: str
    transform: DenseTransform = "identity"
    fill: float = 0.0
    clip_min: float | None = None
    clip_max: float | None = None

    def __post_init__(self) -> None:
        if self.transform not in ("identity", "log1p"):
            raise ValueError(
                f"dense field '{self.name}': transform must be 'identity' or 'log1p', "
                f"got {self.transform!r}"
            )
        if (
            self.clip_min is not None
            and self.clip_max is not None
            and self.clip_min > self.clip_max
        ):
            raise ValueError(f"dense field '{self.name}': clip_min > clip_max")


@dataclass(frozen=True)
class CategoricalField:
    name: str
    # Multi-valued fields hold several values in one cell, split on ``separator``; at most
    # ``max_values`` are kept (the rest are counted as truncated) and the model mean-pools them.
    separator: str | None = None
    max_values: int = 1

    def __post_init__(self) -> None:
        if self.separator == "":
            raise ValueError(f"categorical field '{self.name}': separator must not be empty")
        if int(self.max_values) < 1:
            raise ValueError(f"categorical field '{self.name}': max_values must be >= 1")

    @property
    def width(self) -> int:
        return self.max_values if self.separator else 1


@dataclass(frozen=True)
class Schema:
    name: str
    label: str | None
    dense: tuple[DenseField, ...]
    categorical: tuple[CategoricalField, ...]
    # Layout of the raw file.
    format: Literal["csv", "parquet"] = "csv"
    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | None = None  # required when header is False
    drop: tuple[str, ...] = ()
    time_column: str | None = None  # enables time-ordered splits
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from user code) but store tuples, so schemas stay hashable/immutable.
        for name in ("dense", "categorical", "drop"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.column_names is not None:
            object.__setattr__(self, "column_names", tuple(self.column_names))
        if self.format not in ("csv", "parquet"):
            raise ValueError(
                f"schema '{self.name}': format must be 'csv' or 'parquet', got {self.format!r}"
            )
        if len(self.delimiter) != 1:
            raise ValueError(
                f"schema '{self.name}': delimiter must be one character, got {self.delimiter!r}"
            )
        names = [self.label] if self.label else []
        names += [f.name for f in self.dense] + [f.name for f in self.categorical]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"schema '{self.name}': column(s) {dup} used more than once (label/dense/categorical)"
            )
        if self.column_names is not None:
            derived = (
                {"hour_of_day", "weekday"}
                if "avazu_hour" in self.extra.get("derive", ())
                else set()
            )
            missing = [n for n in names if n not in self.column_names and n not in derived]
            if missing:
                raise ValueError(
                    f"schema '{self.name}': column(s) {missing} are not in column_names"
                )

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.dense]

    @property
    def categorical_names(self) -> list[str]:
        return [f.name for f in self.categorical]

    @property
    def n_token_slots(self) -> int:
        """Columns of the (B, S) token matrix: one per single-valued field, max_values per bag."""
        return sum(f.width for f in self.categorical)

    def slot_fields(self) -> list[int]:
        """Field index of each token slot."""
        out: list[int] = []
        for i, f in enumerate(self.categorical):
            out.extend([i] * f.width)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense"] = [asdict(f) for f in self.dense]
        d["categorical"] = [asdict(f) for f in self.categorical]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schema:
        d = dict(d)
        dense = tuple(_field(DenseField, f) for f in d.pop("dense", []) or [])
        cats = tuple(_field(CategoricalField, f) for f in d.pop("categorical", []) or [])
        if not cats:
            raise ValueError("schema: 'categorical' must list at least one field")
        names = d.pop("column_names", None)
        drop = tuple(d.pop("drop", ()))
        known = {"name", "label", "format", "delimiter", "header", "time_column", "extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"schema: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        schema = cls(
            name=d.get("name", "table"),
            label=d.get("label"),
            dense=dense,
            categorical=cats,
            format=d.get("format", "csv"),
            delimiter=d.get("delimiter", ","),
            header=d.get("header", True),
            column_names=tuple(names) if names else None,
            drop=drop,
            time_column=d.get("time_column"),
            extra=d.get("extra", {}),
        )
        if not schema.header and schema.format == "csv" and not schema.column_names:
            raise ValueError("schema: 'column_names' is required when 'header' is false")
        return schema

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"schema file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # optional: only needed for YAML schema files

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ValueError as e:  # json.JSONDecodeError and yaml.YAMLError's parse errors
            raise ValueError(f"schema file {p}: cannot parse: {e}") from None
        except Exception as e:  # yaml.YAMLError does not derive from ValueError
            raise ValueError(f"schema file {p}: cannot parse: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"schema file {p}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"schema file {p}: {e}") from None


def _field(kind: type, spec: Any) -> Any:
    """A DenseField/CategoricalField from a name or a dict, with a clear error for bad keys."""
    if isinstance(spec, str):
        return kind(name=spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"schema: each field must be a name or a mapping with 'name', got {spec!r}"
        )
    allowed = set(kind.__dataclass_fields__)
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(
            f"schema: field '{spec['name']}': unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return kind(**spec)


def criteo_schema(labelled: bool = True) -> Schema:
    """Criteo Kaggle: label, I1..I13 (counts, may be negative or empty), C1..C26 (hex strings)."""
    dense = tuple(DenseField(f"I{i}", transform="log1p", clip_min=0.0) for i in range(1, 14))
    cats = tuple(CategoricalField(f"C{i}") for i in range(1, 27))
    names = (
        (("label",) if labelled else ())
        + tuple(f.name for f in dense)
        + tuple(f.name for f in cats)
    )
    return Schema(
        name="criteo",
        label="label" if labelled else None,
        dense=dense,
        categorical=cats,
        format="csv",
        delimiter="\t",
        header=False,
        column_names=names,
    )


AVAZU_CATEGORICAL = [
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]


def avazu_schema() -> Schema:
    """Avazu: drop ``id``; ``hour`` (YYMMDDHH) becomes hour-of-day and weekday; all else categorical."""
    cats = tuple(CategoricalField(n) for n in ["hour_of_day", "weekday", *AVAZU_CATEGORICAL])
    return Schema(
        name="avazu",
        label="click",
        dense=(),
        categorical=cats,
        format="csv",
        delimiter=",",
        header=True,
        drop=("id",),
        time_column="hour",
        extra={"derive": ["avazu_hour"]},
    )
