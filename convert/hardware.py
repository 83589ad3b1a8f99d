"""What this machine's CPU computes natively. Training (``train/precision``) and evaluation
(``evaluation/perplexity``) both ask, so the probe lives here rather than in either."""

from __future__ import annotations

import torch

# oneDNN's own probes: True where it has kernels for the dtype (bf16: AVX512-BF16/AMX or AVX512 core;
# fp16: AVX512-FP16/AMX-FP16). Without them PyTorch runs the matmuls through a reference GEMM.
_PROBES = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has fast matmul kernels for ``dtype``; float32 always does."""
    if dtype == torch.float32:
        return True
    probe = _PROBES.get(dtype)
    if probe is None:
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume the slow path
        return False


def cpu_has_native_bf16() -> bool:
    return cpu_has_native(torch.bfloat16)
