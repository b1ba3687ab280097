"""Embedding kinds. Importing this package registers every kind with ``build_embedding``."""

from lma.embeddings.base import EMBEDDINGS, Embedding, EmbeddingSpec, build_embedding
from lma.embeddings import tables  # noqa: F401  (full, hash)
from lma.embeddings import lma, qr, robez  # noqa: F401  (shared memory and compositional kinds)

__all__ = ["EMBEDDINGS", "Embedding", "EmbeddingSpec", "build_embedding"]
