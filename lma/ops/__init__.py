"""Custom operators of the core: the hashed gather that reads LMA / ROBE-Z embeddings."""

from lma.ops.hashed_gather import HashedGatherConfig, hashed_gather, slot_indices_torch

__all__ = ["HashedGatherConfig", "hashed_gather", "slot_indices_torch"]
