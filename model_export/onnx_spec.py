"""Names and versions of the custom ONNX op, importable without onnx or torch (the serving side
checks bundles against them)."""

DOMAIN = "ai.lma"
OP_TYPE = "HashedGather"
INDICES_OP_TYPE = "HashedGatherIndices"
OP_VERSION = 1
