"""Embedding kinds. Importing this package registers every kind with ``build_embedding``."""

from lma.embeddings import (  # noqa: F401  (shared memory and compositional kinds)
    lma,
    qr,
    robez,
    tables,  # noqa: F401  (full, hash)
)
from lma.embeddings.base import EMBEDDINGS, Embedding, EmbeddingSpec, build_embedding

__all__ = ["EMBEDDINGS", "Embedding", "EmbeddingSpec", "build_embedding"]
