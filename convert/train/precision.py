"""Which precision uptraining runs in: ``auto`` picks bf16 where the hardware computes it natively and
fp32 where it does not. On a CPU without native bf16 (AVX2-only, e.g. many AMD EPYC hosts) PyTorch falls
back to a reference GEMM: SmolLM2's layer matmuls over 2,048 tokens ran 33-65x slower under bf16 autocast
than in fp32 (``scripts/bench_precision.py``), so a bf16 recipe that runs in minutes on an AVX512/AMX host
takes hours."""

from __future__ import annotations

import torch

from ..hardware import cpu_has_native_bf16

# the recipe's precision -> accelerate's mixed_precision
ACCELERATE = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def resolve_precision(requested: str, cuda: bool, native_bf16: bool) -> tuple[str, str | None]:
    """The precision to train in and, when the choice will be slow, a warning that names the fix.
    ``native_bf16``: the device computes bf16 natively (CUDA: ``torch.cuda.is_bf16_supported()``; CPU:
    ``cpu_has_native_bf16()``)."""
    if requested == "auto":
        return ("bf16" if native_bf16 else "fp32"), None
    if requested == "bf16" and not cuda and not native_bf16:
        return requested, ("precision: bf16 on a CPU without native bf16 kernels (no AVX512/AMX) runs its matmuls "
                           "33-65x slower than fp32 (scripts/bench_precision.py); set precision: auto (or fp32) in the recipe")
    return requested, None


def detect_precision(requested: str) -> tuple[str, str | None]:
    """``resolve_precision`` for the device this process trains on."""
    cuda = torch.cuda.is_available()
    native = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    return resolve_precision(requested, cuda, native)
