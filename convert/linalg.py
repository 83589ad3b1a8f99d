"""The linear algebra every fit shares: PSD square roots, ridge solves, whitened PCA. Float64 in, out.

One copy of each, so a floor or a factorisation is chosen once: SPD systems are solved by Cholesky,
not LU (batched LU on CPU failed on finite inputs once a model forward had run in the same process:
MKL "DLASWP parameter 6"), with LU only as the fallback when rounding leaves a system indefinite.
"""

from __future__ import annotations

import torch


def relative_mse(y: torch.Tensor, target: torch.Tensor) -> float:
    """||y - target||^2 / ||target||^2 (float64)."""
    y, target = y.to(torch.float64), target.to(torch.float64)
    return float((y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-300))


def psd_sqrt(S: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S^1/2, S^-1/2)`` of symmetric PSD matrices (batched over leading dims), eigenvalues floored at
    ``floor`` x the largest so the inverse stays finite on rank-deficient statistics."""
    S = 0.5 * (S + S.transpose(-1, -2))
    lam, V = torch.linalg.eigh(S)
    lam = lam.clamp_min(floor * lam.amax(-1, keepdim=True).clamp_min(1e-300))
    Vt = V.transpose(-1, -2)
    root = lam.sqrt()[..., None, :]
    return (V * root) @ Vt, (V / root) @ Vt


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^-1 B`` for symmetric positive definite ``A`` (batched); ``B`` is (..., n) or (..., n, k).
    A singular ``A`` (statistics of a layer that outputs nothing, e.g. zero values) gets the
    minimum-norm least-squares solution instead of an error."""
    vec = B.dim() == A.dim() - 1
    Bm = B[..., None] if vec else B
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        X, info = torch.linalg.solve_ex(A, Bm)
        if bool((info != 0).any()):
            X = torch.linalg.pinv(A, hermitian=True) @ Bm
    else:
        X = torch.cholesky_solve(Bm, L)
    return X[..., 0] if vec else X


def ridge_solve(G: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lam I)^-1 B`` with ``lam = ridge x mean diag(G)``: the normal equations of a ridge fit
    whose strength is relative to the data's scale (G = Z^T Z, batched over leading dims)."""
    lam = ridge * G.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    return spd_solve(G + lam[..., None, None] * eye, B)


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
        M -= Z.T @ spd_solve(K, Z @ M)
        return (M / lam).T
    return spd_solve(Z.T @ Z + lam * torch.eye(d, dtype=torch.float64), M).T


def top_eigvecs(S: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` leading eigenpairs of symmetric ``S`` (batched), largest first: (values (..., k), vectors (..., n, k))."""
    lam, U = torch.linalg.eigh(S)
    return lam[..., -k:].flip(-1), U[..., -k:].flip(-1)


def whitened_pca(cov: torch.Tensor, metric: torch.Tensor, k: int, floor: float = 1e-8):
    """The ``k``-dim subspace of activations ``a`` (second moment ``cov``) that loses least under the
    norm ``|a|_M^2 = a^T M a``: PCA in whitened coordinates ``u = M^1/2 a``. Batched.

    Returns ``(P, Q)``: P (..., k, n) maps a to the kept coordinates, Q (..., n, k) maps them back
    (Q P is the M-orthogonal projector; exactly the identity when k = n and M is full rank).
    """
    L, Linv = psd_sqrt(metric, floor)
    _, E = top_eigvecs(L @ cov @ L.transpose(-1, -2), k)
    return E.transpose(-1, -2) @ L, Linv @ E
