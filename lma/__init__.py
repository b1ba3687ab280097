"""LMA-CTR: small, fast click-through-rate models with LSH-based Memory Allocation embeddings."""

__version__ = "0.1.0"
