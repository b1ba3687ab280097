"""Data: readers for the ``--data`` spec forms, a synthetic generator, and splits.

>>> src = open_source("synth:10000:1")
>>> data = src.read_all()
>>> train, val, test = random_split(len(data), seed=0)
"""

from lma.data.base import (
    BadDataError,
    BadLineReport,
    DataSource,
    RawChunk,
    concat_encoded,
    empty_encoded,
    take,
)
from lma.data.readers import (
    SPEC_FORMS,
    CsvSource,
    ParquetSource,
    TableSource,
    data_root,
    open_source,
)
from lma.data.splits import random_split, time_split

__all__ = [
    "SPEC_FORMS",
    "BadDataError",
    "BadLineReport",
    "CsvSource",
    "DataSource",
    "ParquetSource",
    "RawChunk",
    "TableSource",
    "concat_encoded",
    "data_root",
    "empty_encoded",
    "open_source",
    "random_split",
    "take",
    "time_split",
]
