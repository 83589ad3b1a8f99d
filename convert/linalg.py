"""Ridge least squares towards a prior, the closed form behind the o_proj and q_proj refits."""

from __future__ import annotations

import torch


def ridge_towards(Z: torch.Tensor, Y: torch.Tensor, W0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W |Y - Z W^T|^2 + lam |W - W0|^2`` with ``lam = ridge x mean diag(Z^T Z)``, float64.

    Z (N, d) inputs, Y (N, out) targets, W0 (out, d) prior; returns W (out, d). With fewer rows N
    than inputs d it is solved through the N x N Gram (Woodbury: the same minimiser): at 8B a
    conversion's d = 4096 head outputs against 512 calibration tokens would otherwise build and
    factor a d x d system per layer.
    """
    Z, Y, W0 = Z.double(), Y.double(), W0.double()
    N, d = Z.shape
    lam = ridge * float(Z.pow(2).sum()) / d
    M = Z.T @ Y + lam * W0.T  # (d, out)
    if N < d:
        K = Z @ Z.T + lam * torch.eye(N, dtype=torch.float64)
        M -= Z.T @ torch.cholesky_solve(Z @ M, torch.linalg.cholesky(K))
        return (M / lam).T
    return torch.linalg.solve(Z.T @ Z + lam * torch.eye(d, dtype=torch.float64), M).T
