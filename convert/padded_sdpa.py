"""SDPA for layouts whose values are narrower than their queries and keys (our MLA outputs: q/k
``qk_nope + qk_rope`` wide, v ``v_head_dim``).

PyTorch's fused CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) needs one head width for q,
k and v; with a narrower v it falls back to the math path, which materialises a float32 T x T score and
probability matrix per head and keeps them for the backward pass. For SmolLM2 MLA at 4,096 tokens that is
the whole of a 22.7 GB uptraining floor (``scripts/bench_memory.py``), and it halves training throughput.

Zero-padding v to the q/k width and slicing the output back is exact (the padded columns are weighted
sums of zeros), so the fused kernel runs instead. transformers' DeepSeek-V3 does the same for
FlashAttention-2 only. This registers it as an attention implementation for loading, training and
evaluation here; the checkpoints we write are unchanged (``_attn_implementation`` is not saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_padded_v"


def pad_values(value: torch.Tensor, width: int) -> torch.Tensor:
    """``value`` (..., d_v) zero-padded on its last dimension to ``width``."""
    return F.pad(value, (0, width - value.shape[-1])) if value.shape[-1] < width else value


def padded_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with v padded to q's width and the output sliced back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    d_v = value.shape[-1]
    out, weights = sdpa_attention_forward(module, query, key, pad_values(value, query.shape[-1]), attention_mask, **kwargs)
    return out[..., :d_v], weights  # out is (batch, seq, heads, width)


def register() -> str:
    """Make ``NAME`` a valid ``attn_implementation`` (idempotent), with SDPA's own mask; return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, padded_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def values_narrower(config) -> bool:
    """Whether a config (object or dict) declares values narrower than its queries/keys."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    v = get("v_head_dim")
    if v is None or get("qk_nope_head_dim") is None:
        return False
    return int(v) < int(get("qk_nope_head_dim")) + int(get("qk_rope_head_dim") or 0)


def sdpa_for(config) -> str:
    """The SDPA implementation to load ``config`` with: the padded one where v is narrower, else plain SDPA."""
    return register() if values_narrower(config) else "sdpa"
