"""RoPE-safe linear maps across KV heads, one complex matrix per rotary frequency.

In rotate-half RoPE, dims ``f`` and ``f + R/2`` of a head form the plane of frequency ``f``; read
as the complex number ``k[f] + i k[f + R/2]``, RoPE multiplies it by ``exp(i theta_f t)``, the same
for every head. A complex map ``A_f`` (G x G) applied across the G KV heads of one frequency
therefore commutes with RoPE: ``z = A k`` per frequency is still a valid key, and a query of head
``h`` (reading KV head ``j``) that scored ``Re(q conj(k_j))`` scores the same against
``z_m`` with ``q'_m = q * conj(inv(A)[j, m])``. With every component kept this is exact; dropping
components ``m >= r`` after a PCA basis is the lossy step ("RoRoPE" in TransMLA, and the
RoPE-aware head alignment used for GQA merging).

Functions take weight rows (``(..., D, hidden)``) and return weight rows: the math never
touches activations except to estimate the basis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_planes(x: torch.Tensor, rotary_dim: int, dim: int = -1) -> torch.Tensor:
    """Real (..., R, ...) rotate-half dims -> complex (..., R/2, ...) planes along ``dim``."""
    half = rotary_dim // 2
    re = x.narrow(dim, 0, half)
    im = x.narrow(dim, half, half)
    return torch.complex(re.double(), im.double())


def from_planes(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of ``to_planes`` (float64 out)."""
    return torch.cat([z.real, z.imag], dim=dim)


def plane_covariance(keys: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Per-frequency complex covariance across heads.

    keys: (N, G, D) pre-RoPE key activations. Returns (R/2, G, G) Hermitian ``sum_t k k^H``.
    RoPE rotates every head of a frequency by the same phase, so this is the same before and
    after RoPE: positions do not matter for the basis.
    """
    z = to_planes(keys[..., :rotary_dim], rotary_dim)  # (N, G, F)
    z = z.permute(2, 1, 0)  # (F, G, N)
    return z @ z.conj().transpose(-1, -2)


def pca_basis(cov: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency basis ``A`` (F, G, G) ordering components by (weighted) energy, and ``inv(A)``.

    weights: (F, G) positive importance of each head's key error in each frequency, e.g. the RMS of
    the queries that read it. The basis minimises the weighted error of keeping the first r
    components: ``A = U^H W`` with U the eigenvectors of ``W C W``.
    """
    F, G, _ = cov.shape
    if weights is None:
        weights = torch.ones(F, G, dtype=torch.float64)
    w = weights.to(torch.float64).clamp_min(1e-12)
    W = torch.diag_embed(w).to(cov.dtype)
    Winv = torch.diag_embed(1.0 / w).to(cov.dtype)
    evals, U = torch.linalg.eigh(W @ cov @ W)
    U = U.flip(-1)  # descending energy
    A = U.conj().transpose(-1, -2) @ W
    A_inv = Winv @ U
    return A, A_inv


def rotate_keys(k: torch.Tensor, A: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Key weight rows (G, D, hidden) -> rotated components (G, D, hidden): z_m = sum_j A[m, j] k_j.

    Dims past ``rotary_dim`` (partial RoPE) are not rotated by RoPE and are returned unchanged
    per head. Works for biases too: pass (G, D, 1).
    """
    kz = to_planes(k[:, :rotary_dim], rotary_dim, dim=1)  # (G, F, hidden) complex
    z = torch.einsum("fmj,jfh->mfh", A, kz)
    out = k.double().clone()
    out[:, :rotary_dim] = from_planes(z, dim=1)
    return out.to(k.dtype)


def rotate_queries(
    q: torch.Tensor, A_inv: torch.Tensor, kv_index: torch.Tensor, rotary_dim: int, components: Sequence[int] | None = None
) -> torch.Tensor:
    """Query weight rows (H, D, hidden) -> (H, G, D, hidden): head h's query for rotated key m.

    ``q'_{h,m} = q_h * conj(inv(A)[j(h), m])`` per frequency, so that
    ``sum_m Re(q'_{h,m} conj(z_m)) == Re(q_h conj(k_j))``. Non-rotary dims go to component j(h)
    only (they pair with the unrotated tail of key head j(h)). ``components``: compute only these m
    (output (H, len(components), D, hidden)); the full tensor is H x G x hidden x D float64, over a
    gigabyte for an 8B layer.
    """
    H, D, hidden = q.shape
    comps = list(range(A_inv.shape[-1])) if components is None else list(components)
    coef = A_inv[:, kv_index][..., comps].conj()  # (F, H, M): [f, h, m] = conj(A_inv[f, j(h), m])
    out = torch.zeros(H, len(comps), D, hidden, dtype=torch.float64)
    for h in range(H):  # one head at a time: complex (H, M, F, hidden) temporaries are ~0.4 GB at 8B
        qz = to_planes(q[h, :rotary_dim], rotary_dim, dim=0)  # (F, hidden)
        out[h, :, :rotary_dim] = from_planes(torch.einsum("fm,fx->mfx", coef[:, h], qz), dim=1)
    if rotary_dim < D:
        for c, m in enumerate(comps):
            heads = (kv_index == m).nonzero().flatten()
            out[heads, c, rotary_dim:] = q[heads, rotary_dim:].double()
    return out.to(q.dtype)
