"""Custom operators of the core: the hashed gather that reads LMA / ROBE-Z embeddings."""

from lma.ops._op import Backend, backend_for, implementation, slot_indices
from lma.ops.hashed_gather import (
    GatherConstants,
    HashedGatherConfig,
    hashed_gather,
    hot_embed,
    hot_gather,
    slot_indices_torch,
)
from lma.ops.interaction import dot_interaction, dot_interaction_reference
from lma.ops.key_lookup import KeyLookup, key_lookup, key_lookup_reference
from lma.ops.reference import (
    hashed_gather_backward_reference,
    hashed_gather_reference,
    hot_gather_reference,
)

__all__ = [
    "Backend",
    "GatherConstants",
    "HashedGatherConfig",
    "KeyLookup",
    "backend_for",
    "dot_interaction",
    "dot_interaction_reference",
    "hashed_gather",
    "hashed_gather_backward_reference",
    "hashed_gather_reference",
    "hot_embed",
    "hot_gather",
    "hot_gather_reference",
    "implementation",
    "key_lookup",
    "key_lookup_reference",
    "slot_indices",
    "slot_indices_torch",
]
