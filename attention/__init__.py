"""What attention is in each layout: neutral per-layer form, source adapters, target writers,
KV-cache accounting and kernel choice. Knows layouts, never files (see kvsurgeon.convert)."""

from .families import (
    FAMILIES,
    DictSource,
    UnsupportedArchitectureError,
    embedding_scale,
    family_for,
    head_dim_of,
    read_attention,
    rope_spec,
    sliding_windows,
    supported_model_types,
    write_attention,
)
from .neutral import AttentionWeights, RopeSpec

__all__ = [
    "FAMILIES",
    "AttentionWeights",
    "DictSource",
    "RopeSpec",
    "UnsupportedArchitectureError",
    "embedding_scale",
    "family_for",
    "head_dim_of",
    "read_attention",
    "rope_spec",
    "sliding_windows",
    "supported_model_types",
    "write_attention",
]
