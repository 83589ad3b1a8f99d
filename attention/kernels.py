"""Which fused kernels training and inference bind, with the PyTorch path as the fallback.

transformers picks the attention kernel through ``attn_implementation``; linear layers bind
flash-linear-attention / mamba_ssm by themselves when those packages import (GPU only).
"""

from __future__ import annotations

import importlib.util

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def attn_implementation(requested: str = "auto") -> str:
    """``auto``: FlashAttention-2 on CUDA when installed, otherwise PyTorch SDPA (which runs everywhere)."""
    if requested != "auto":
        return requested
    if has_cuda() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def linear_kernels() -> dict[str, bool]:
    """Fused linear-layer kernels transformers would bind here (all False on a CPU machine)."""
    cuda = has_cuda()
    found = {name: importlib.util.find_spec(name) is not None for name in ("fla", "mamba_ssm", "causal_conv1d")}
    return {name: cuda and ok for name, ok in found.items()}
