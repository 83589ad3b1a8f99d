"""Key merging for sources with per-head q/k RMSNorm (Qwen3), used by ``gqa.calibrated_merge``.

In Qwen3 a key is ``k_j = w * RMSNorm(W_j x)`` (``w``: the layer's k_norm weight, per head-dim,
shared by all KV heads), then RoPE. The norm stays per head and pooling happens after it:

1. the merged block's target key is the mean of its heads' *normalized* keys,
   ``u = mean_j W_j x / rms(W_j x)``; RoPE is linear per position, so pooling before or after it is
   the same, and queries (whose own q_norm is per head too) are left untouched;
2. the new ``k_proj`` rows ``W'`` must make ``RMSNorm(W' x)`` approximate ``u``. The norm removes any
   per-token scale, so ``W'`` is fitted by least squares to ``rho(x) u(x)`` with ``rho`` the heads'
   mean pre-norm rms, i.e. the mean of the heads' keys, each re-scaled to the block's common rms.
   Exact when the heads agree per token up to scale; otherwise the fit residual and the renormalisation
   (``RMSNorm(W' x)`` has rms 1, ``u`` less when heads disagree) are the approximation;
3. the renormalisation is undone on average: k_norm becomes ``c * w`` with ``c`` the least-squares
   scale between the renormalised fit and ``u`` over every block (one scalar: k_norm is shared).

Identical heads in a block make every step exact (tested). The error against mean pooling of the
raw weights is measured in tests/test_qk_norm_merge.py and BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from ..linalg import relative_mse, ridge_towards

F64 = torch.float64
RIDGE = 1e-6  # towards the plain mean of the weights; only steadies a rank-deficient calibration set


def _unit_rms(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rms = (z.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return z / rms, rms


def merge_normed_keys(k: torch.Tensor, X: torch.Tensor, blocks, k_norm: torch.Tensor, eps: float, info: dict):
    """k: (G, D, in+1) augmented key rows; X: (N, in+1) augmented inputs; blocks: KV-head slices.

    Returns the merged key rows (target, D, in+1) and the new k_norm weight (D,).
    """
    new_k, fits, targets = [], [], []
    for kb in blocks:
        z = torch.einsum("ni,gdi->gnd", X, k[kb])  # (r, N, D) pre-norm keys
        u, rms = _unit_rms(z, eps)
        u_bar, rho = u.mean(0), rms.mean(0)
        W = ridge_towards(X, rho * u_bar, k[kb].mean(0), RIDGE)  # (D, in+1)
        new_k.append(W)
        fits.append(_unit_rms(X @ W.T, eps)[0])
        targets.append(u_bar)
    fit, target = torch.cat(fits), torch.cat(targets)
    c = float((fit * target).sum() / fit.pow(2).sum().clamp_min(1e-300))
    info["k_norm_scale"] = c
    info["normed_key_rel_err"] = relative_mse(c * fit, target)
    return torch.stack(new_k), (k_norm.to(F64) * c).to(k_norm.dtype)
