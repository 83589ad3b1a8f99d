"""The per-frequency cross-head map commutes with RoPE: with nothing dropped, scores are unchanged."""

import torch

from kvsurgeon.convert.rope_planes import pca_basis, plane_covariance, rotate_keys, rotate_queries


def rope(x, pos, rotary_dim, theta=10000.0):
    """Rotate-half RoPE on the first rotary_dim dims of x (..., T, D), positions pos (T,)."""
    half = rotary_dim // 2
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos(), ang.sin()
    a, b, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def scores(qw, kw, x, kv_index, rotary_dim):
    """(H, T, T) RoPE scores of query head h against key head kv_index[h]."""
    pos = torch.arange(x.shape[0])
    q = rope(torch.einsum("hdi,ti->htd", qw, x), pos, rotary_dim)
    k = rope(torch.einsum("gdi,ti->gtd", kw, x), pos, rotary_dim)
    return torch.einsum("htd,hsd->hts", q, k[kv_index])


def rotated_scores(qr, kr, x, rotary_dim, keep):
    pos = torch.arange(x.shape[0])
    q = rope(torch.einsum("hmdi,ti->hmtd", qr[:, :keep], x), pos, rotary_dim)
    k = rope(torch.einsum("gdi,ti->gtd", kr[:keep], x), pos, rotary_dim)
    return torch.einsum("hmtd,msd->hts", q, k)


def setup(rotary_dim=8, D=8, G=3, H=6, hidden=16, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = torch.randn(H, D, hidden, generator=g, dtype=torch.float64)
    kw = torch.randn(G, D, hidden, generator=g, dtype=torch.float64)
    x = torch.randn(T, hidden, generator=g, dtype=torch.float64)
    kv_index = torch.arange(H) // (H // G)
    return qw, kw, x, kv_index


def test_full_rotation_preserves_scores():
    for rotary_dim in (8, 4):  # full and partial RoPE
        qw, kw, x, kv_index = setup(rotary_dim=rotary_dim)
        keys = torch.einsum("gdi,ti->tgd", kw, x)
        weights = torch.rand(rotary_dim // 2, kw.shape[0], dtype=torch.float64) + 0.5
        A, A_inv = pca_basis(plane_covariance(keys, rotary_dim), weights)
        kr = rotate_keys(kw, A, rotary_dim)
        qr = rotate_queries(qw, A_inv, kv_index, rotary_dim)
        ref = scores(qw, kw, x, kv_index, rotary_dim)
        got = rotated_scores(qr, kr, x, rotary_dim, keep=kw.shape[0])
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_rotate_queries_component_subset_equals_slice_of_full():
    for rotary_dim in (8, 4):  # full and partial RoPE (the tail goes to component j(h) only)
        qw, kw, x, kv_index = setup(rotary_dim=rotary_dim)
        keys = torch.einsum("gdi,ti->tgd", kw, x)
        A, A_inv = pca_basis(plane_covariance(keys, rotary_dim), torch.ones(rotary_dim // 2, kw.shape[0], dtype=torch.float64))
        full = rotate_queries(qw, A_inv, kv_index, rotary_dim)
        for comps in ([0], [2, 1]):
            torch.testing.assert_close(rotate_queries(qw, A_inv, kv_index, rotary_dim, components=comps), full[:, comps],
                                       rtol=0, atol=0)


def test_pca_orders_energy_and_rank1_is_exact_for_rank1_keys():
    # Keys that are complex multiples of one head (per frequency) fit exactly in one component.
    qw, kw, x, kv_index = setup(rotary_dim=8, D=8)
    c = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    kw = kw[:1] * c[:, None, None]
    keys = torch.einsum("gdi,ti->tgd", kw, x)
    A, A_inv = pca_basis(plane_covariance(keys, 8))
    kr = rotate_keys(kw, A, 8)
    qr = rotate_queries(qw, A_inv, kv_index, 8)
    torch.testing.assert_close(rotated_scores(qr, kr, x, 8, keep=1), scores(qw, kw, x, kv_index, 8), rtol=1e-9, atol=1e-9)
    # Dropping a component of random keys does change the scores (the test can fail).
    qw, kw, x, kv_index = setup(seed=1)
    keys = torch.einsum("gdi,ti->tgd", kw, x)
    A, A_inv = pca_basis(plane_covariance(keys, 8))
    err = rotated_scores(rotate_queries(qw, A_inv, kv_index, 8), rotate_keys(kw, A, 8), x, 8, keep=1) - scores(qw, kw, x, kv_index, 8)
    assert err.abs().max() > 1e-3
