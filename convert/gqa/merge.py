"""MHA/GQA -> GQA/MQA: pooling KV heads into fewer, shared ones.

Pure functions on the neutral form (``kvsurgeon.attention.AttentionWeights``): tensors in, tensors
out, no file I/O. Shapes (see ``attention/neutral.py``)::

    q (H, D, hidden)   k (G, D, hidden)   v (G, Dv, hidden)   o (hidden, H, Dv)

Query head ``h`` reads KV head ``h // (H // G)``. Merging G KV heads into ``target`` heads merges
each contiguous block of ``r = G // target`` KV heads; the query heads reading that block are a
contiguous block too, so the layout needs no q/o change (``permute_heads`` first if the heads to
merge are not contiguous).

Methods:

* ``mean_pool``: the GQA paper's baseline, the mean of each block's K/V weights (and biases).
* ``expand_to_mha``: the exact inverse direction, KV heads repeated until G == H.
* ``calibrated_merge``: the default. Given attention inputs ``x`` on calibration tokens it builds
  the shared head that loses least, piece by piece (each piece measured on SmolLM2-135M 3 -> 1 KV
  heads, see ``scripts/experiments/gqa_ablation.py``):

  1. keys, per RoPE frequency: the best rank-1 *complex* fit of the block's keys (a
     rotation-scaling per frequency commutes with RoPE, see ``rope_planes``), weighted by the RMS
     of the queries reading each head and, per key token, by the source softmax's sensitivity to
     its score; every query head absorbs its head's complex coefficient. Dims past ``rotary_dim``
     (partial RoPE) and the slowest RoPE planes, which barely turn over the context, are pooled
     into one query-whitened PCA instead (it may move content between planes: the single biggest
     gain, since those planes carry most of the score variance; exact RoPE with nope_planes=0).
     How many, per layer: the count whose merge errs least on the calibration windows and on the
     same windows with positions stretched to the served context (``_least_error_nope_planes``).
  2. values: the best rank-Dv fit of the block's stacked values, each head whitened by the energy
     of the o-projection columns that read it (so the PCA minimises the attention output error),
     tokens weighted by the attention they receive; each query head's o columns absorb its head's
     reconstruction map (``o_h' = o_h P_j``).
  3. a ridge least-squares refit of ``o_proj`` so the layer's attention output on the calibration
     tokens moves least.

  ``MergeOptions`` holds the method's options (defaults: what ``--to gqa/mqa`` runs); inside
  ``calibrated_merge`` each step is one helper: ``_shared_values`` (2), ``_shared_keys`` (1, with
  ``_least_error_nope_planes`` choosing the pooled planes), ``refit_o`` (3), ``_assemble``.

  A query refit adds nothing to step 1 under the score-MSE objective (the best query for a fixed
  shared key is the projection coefficient it already has). Biases are an extra input column of
  ones throughout. Sources with q/k RMSNorm (Qwen3) keep queries and the norms per head and merge
  keys after the norm instead of step 1 (``qk_norm_merge``); steps 2 and 3 are unchanged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kvsurgeon.attention.neutral import AttentionWeights, RopeSpec
from kvsurgeon.attention.reference import (
    _as_batch, _values, attention_output, causal_prob_blocks, head_outputs, resolve_rope, rope_tables, source_qk,
    source_score_block,
)

from ..errors import KvSurgeonError
from .qk_norm import merge_normed_keys
from ..linalg import psd_sqrt, relative_mse, ridge_towards, top_eigvecs
from ..rope_planes import pca_basis, plane_covariance, rotate_keys, rotate_queries, to_planes

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_kv_heads(num_heads: int, num_kv_heads: int, target: int) -> None:
    """Raise ``KvSurgeonError`` unless ``num_kv_heads`` KV heads can be pooled into ``target``."""
    pool_choices = [d for d in _divisors(num_kv_heads) if num_heads % d == 0]
    choices = ", ".join(map(str, pool_choices))
    if target < 1:
        raise KvSurgeonError(
            f"--kv-heads must be at least 1 (got {target}); valid choices for this model: {choices}."
        )
    if num_heads % target:
        valid = ", ".join(map(str, _divisors(num_heads)))
        raise KvSurgeonError(
            f"--kv-heads {target} does not divide the {num_heads} query heads: every KV head must be "
            f"shared by the same number of query heads. Valid KV-head counts for {num_heads} query heads: "
            f"{valid} (pooling from the current {num_kv_heads}: {choices})."
        )
    if target > num_kv_heads:
        raise KvSurgeonError(
            f"--kv-heads {target} is more than the model's current {num_kv_heads} KV heads. Pooling can only "
            f"reduce KV heads; going up is only possible as an exact repeat of every head up to "
            f"{num_heads} (use expand_to_mha), which grows the KV cache. Valid choices for pooling: {choices}."
        )
    if num_kv_heads % target:
        raise KvSurgeonError(
            f"--kv-heads {target} does not divide the current {num_kv_heads} KV heads: pooling needs groups of "
            f"equal size ({num_kv_heads} % {target} != 0). Valid choices: {choices}."
        )


def _check_attn(attn: AttentionWeights, target: int) -> None:
    check_kv_heads(attn.num_heads, attn.num_kv_heads, target)


# --------------------------------------------------------------------------------------------
# Exact reshuffles and the mean-pooling baseline
# --------------------------------------------------------------------------------------------


def _block_mean(t: torch.Tensor | None, target: int) -> torch.Tensor | None:
    if t is None:
        return None
    G = t.shape[0]
    return t.double().reshape(target, G // target, *t.shape[1:]).mean(1).to(t.dtype)


def mean_pool(attn: AttentionWeights, target: int) -> AttentionWeights:
    """GQA-paper baseline: each new KV head is the mean of a contiguous block of KV heads (weights and
    biases). q/o are unchanged: the query heads of a block already form a contiguous block."""
    _check_attn(attn, target)
    projection = attn.qk_norm_scope == "projection"  # OLMo-2: k_norm has a weight per KV head and dim
    return attn.with_(
        k=_block_mean(attn.k, target),
        v=_block_mean(attn.v, target),
        k_bias=_block_mean(attn.k_bias, target),
        v_bias=_block_mean(attn.v_bias, target),
        k_norm=_block_mean(attn.k_norm, target) if projection else attn.k_norm,
    )


def expand_to_mha(attn: AttentionWeights) -> AttentionWeights:
    """Repeat every KV head for each query head that reads it, so G == H (exact, grows the cache)."""
    n = attn.group_size

    def rep(t):
        return None if t is None else t.repeat_interleave(n, dim=0)

    k_norm = rep(attn.k_norm) if attn.qk_norm_scope == "projection" else attn.k_norm
    return attn.with_(k=rep(attn.k), v=rep(attn.v), k_bias=rep(attn.k_bias), v_bias=rep(attn.v_bias), k_norm=k_norm)


def _query_order(kv_order: Sequence[int], n: int) -> torch.Tensor:
    """The query heads in their new order when KV heads move to ``kv_order`` (``n`` query heads each)."""
    return (torch.tensor(list(kv_order))[:, None] * n + torch.arange(n)[None]).reshape(-1)


def permute_heads(attn: AttentionWeights, kv_order: Sequence[int]) -> AttentionWeights:
    """Reorder KV heads: new KV head i is old KV head ``kv_order[i]``. The query heads reading it move
    with it (and their o columns), so the layer computes exactly the same function."""
    G, n = attn.num_kv_heads, attn.group_size
    order = [int(j) for j in kv_order]
    if sorted(order) != list(range(G)):
        raise KvSurgeonError(f"kv_order must be a permutation of 0..{G - 1}, got {list(kv_order)}")
    kv = torch.tensor(order)
    qh = _query_order(order, n)

    def pick(t, idx, dim=0):
        return None if t is None else t.index_select(dim, idx)

    return attn.with_(
        q=pick(attn.q, qh), k=pick(attn.k, kv), v=pick(attn.v, kv), o=pick(attn.o, qh, 1),
        q_bias=pick(attn.q_bias, qh), k_bias=pick(attn.k_bias, kv), v_bias=pick(attn.v_bias, kv),
    )


# --------------------------------------------------------------------------------------------
# Grouping KV heads by similarity
# --------------------------------------------------------------------------------------------


def _block_topk(cov: torch.Tensor, d: int):
    """Scorer: energy of the best rank-``d`` fit of a group's stacked d-dim activations, from the
    full (G d, G d) second moment (sliced per group, so no pass over the tokens per group)."""

    def kept(group: Sequence[int]) -> torch.Tensor:
        idx = torch.cat([torch.arange(j * d, (j + 1) * d) for j in group])
        return torch.linalg.eigvalsh(cov[idx][:, idx])[-d:].sum()

    return kept


def _key_energy(keys: torch.Tensor, rotary_dim: int, weights: torch.Tensor | None):
    """Function scoring a group of KV heads by the fraction of (weighted) key energy one complex
    component per frequency keeps (plus one real PCA over the non-rotary dims)."""
    keys = keys.to(F64)
    N, G, D = keys.shape
    cov = plane_covariance(keys, rotary_dim)  # (F, G, G)
    if weights is not None:
        w = weights.to(F64).to(cov.dtype)
        cov = w[:, :, None] * cov * w[:, None, :]
    tail = keys[..., rotary_dim:].reshape(N, -1)  # (N, G * Dt)
    Dt = D - rotary_dim
    tail_kept = _block_topk(tail.T @ tail, Dt) if Dt else None
    total = cov.diagonal(dim1=-2, dim2=-1).real.sum() + tail.pow(2).sum()

    def score(group: Sequence[int]) -> float:
        g = torch.tensor(group)
        kept = torch.linalg.eigvalsh(cov[:, g][:, :, g])[:, -1].sum()
        if tail_kept is not None:
            kept = kept + tail_kept(group)
        return float(kept / total.clamp_min(1e-300))

    return score


def _value_energy(values: torch.Tensor):
    values = values.to(F64)
    N, G, Dv = values.shape
    flat = values.reshape(N, G * Dv)
    kept = _block_topk(flat.T @ flat, Dv)
    total = values.pow(2).sum().clamp_min(1e-300)
    return lambda group: float(kept(group) / total)


def _equal_partitions(items: list[int], size: int):
    """All partitions of ``items`` into groups of ``size`` (canonical: each group starts with its
    smallest remaining item)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        left = [i for i in rest if i not in others]
        for tail in _equal_partitions(left, size):
            yield [[first, *others], *tail]


def _num_partitions(G: int, target: int) -> int:
    r = G // target
    return math.factorial(G) // (math.factorial(r) ** target * math.factorial(target))


def similarity_groups(
    keys: torch.Tensor,
    target: int,
    *,
    values: torch.Tensor | None = None,
    rotary_dim: int | None = None,
    key_weights: torch.Tensor | None = None,
    max_exhaustive: int = 20000,
) -> list[int]:
    """A KV-head order whose contiguous blocks of ``G // target`` heads merge best.

    keys: (N, G, D) pre-RoPE key activations (for a weight-only grouping pass ``k.permute(2, 0, 1)``,
    i.e. isotropic inputs); values: optional (N, G, Dv) activations (whiten them first to weigh
    heads by their output energy); key_weights: optional (F, G) per-frequency query RMS as in
    ``pca_basis``. A group scores the fraction of key energy kept by one complex component per RoPE
    frequency plus the fraction of value energy kept by a rank-Dv fit; the order maximises the sum
    over groups (exhaustive search when the partitions are few, else greedy plus pairwise swaps).
    Feed the result to ``permute_heads``.
    """
    N, G, D = keys.shape
    check_kv_heads(G, G, target)
    r = G // target
    if r == 1 or target == 1:
        return list(range(G))
    kscore = _key_energy(keys, D if rotary_dim is None else rotary_dim, key_weights)
    vscore = _value_energy(values) if values is not None else None

    cache: dict[tuple[int, ...], float] = {}

    def score(group) -> float:
        key = tuple(sorted(group))
        if key not in cache:
            cache[key] = kscore(key) + (vscore(key) if vscore else 0.0)
        return cache[key]

    if _num_partitions(G, target) <= max_exhaustive:
        best = max(_equal_partitions(list(range(G)), r), key=lambda p: sum(score(g) for g in p))
    else:
        left, best = list(range(G)), []
        while left:  # greedy: grow a group from the first free head by the best next head
            group = [left.pop(0)]
            while len(group) < r:
                j = max(left, key=lambda c: score(group + [c]))
                group.append(j)
                left.remove(j)
            best.append(group)
        improved = True
        while improved:  # pairwise swaps between groups
            improved = False
            for a, b in itertools.combinations(range(len(best)), 2):
                for i, j in itertools.product(range(r), range(r)):
                    ga, gb = list(best[a]), list(best[b])
                    ga[i], gb[j] = gb[j], ga[i]
                    if score(ga) + score(gb) > score(best[a]) + score(best[b]) + 1e-12:
                        best[a], best[b], improved = ga, gb, True
    return [j for g in best for j in sorted(g)]


# --------------------------------------------------------------------------------------------
# Calibrated merging
# --------------------------------------------------------------------------------------------


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Weight rows (..., d, hidden) and bias (..., d) -> (..., d, hidden + 1): bias as a column of
    an extra input that is always 1."""
    w = w.to(F64)
    col = b.to(F64)[..., None] if b is not None else w.new_zeros(*w.shape[:-1], 1)
    return torch.cat([w, col], dim=-1)


def shared_basis(
    rows: Sequence[torch.Tensor], metrics: Sequence[torch.Tensor], cov: torch.Tensor, rank: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shared rows ``W`` (rank, in) and maps ``P_j`` (d, rank) minimising
    ``sum_j E_x || L_j (W_j - P_j W) x ||^2`` with ``L_j^T L_j = metrics[j]``.

    rows: per-head weight rows W_j (d, in); metrics: (d, d) PSD importance of each output dim
    (e.g. o-projection Gram for values, query covariance for keys); cov: (in, in) input second
    moment ``sum_t x x^T``. The solution is a PCA of the stacked whitened activations; ``W`` is
    rescaled so its activations carry the mean energy of the heads it replaces.
    """
    Ls, Linvs = zip(*(psd_sqrt(m, 1e-10) for m in metrics))
    Y = torch.cat([L @ W for L, W in zip(Ls, rows)])  # (r d, in)
    _, U = top_eigvecs(Y @ cov @ Y.T, rank)
    W = U.T @ Y
    energy = torch.einsum("ri,ij,rj->", W, cov, W)
    target = sum(torch.einsum("ri,ij,rj->", Wj, cov, Wj) for Wj in rows) / len(rows)
    alpha = float((target / energy.clamp_min(1e-300)).sqrt()) if energy > 0 else 1.0
    d = rows[0].shape[0]
    P = [Linv @ U[j * d:(j + 1) * d] / alpha for j, Linv in enumerate(Linvs)]
    return W * alpha, P


def _merge_keys(q, k, X, rotary_dim, n_q, head_w, *, token_w=None, nope_planes=0):
    """One block: q (Hb, D, in+1), k (r, D, in+1) augmented rows, X (N, in+1) inputs.

    token_w: optional (N,) importance of each key token. nope_planes: how many of the slowest RoPE
    planes are treated as non-rotary and pooled with the tail dims (see ``calibrated_merge``).
    head_w: (Hb,) float64 importance of each query head (a query's score error counts ``head_w`` times).
    Returns the shared key rows (D, in+1) and the new query rows (Hb, D, in+1).
    """
    Hb, D, _ = q.shape
    r = k.shape[0]
    R = rotary_dim
    F = R // 2
    kv_local = torch.arange(Hb) // n_q
    keys = torch.einsum("ni,gdi->ngd", X, k)  # (N, r, D)
    qa = torch.einsum("ni,hdi->nhd", X, q)  # (N, Hb, D)
    tw = torch.ones(X.shape[0], dtype=F64) if token_w is None else token_w.to(F64) / token_w.mean()
    new_k = torch.zeros(D, k.shape[-1], dtype=F64)
    new_q = torch.zeros_like(q)
    if R:
        # query energy per (frequency, KV head): a key error e in plane f costs E|q_f|^2 |e|^2
        qpow = to_planes(qa[..., :R], R).abs().pow(2).mean(0) * head_w[:, None]  # (Hb, F)
        w = torch.zeros(F, r, dtype=F64).index_add_(1, kv_local, qpow.T).sqrt()
        A, A_inv = pca_basis(plane_covariance(keys * tw.sqrt()[:, None, None], R), w)
        kz = rotate_keys(k, A, R)[0]  # component 0 (rows :R meaningful)
        qz = rotate_queries(q, A_inv, kv_local, R, components=[0])[:, 0]  # only the kept component
        # rescale each plane so the shared key keeps the heads' mean energy (numerics only)
        z = to_planes((X @ kz[:R].T), R)  # (N, F)
        have = z.abs().pow(2).mean(0)
        want = to_planes(keys[..., :R], R).abs().pow(2).mean(0).mean(0)  # (F,)
        s = (want / have.clamp_min(1e-300)).sqrt().where(have > 0, torch.ones_like(have))
        s2 = torch.cat([s, s])
        new_k[:R] = kz[:R] * s2[:, None]
        new_q[:, :R] = qz[:, :R] / s2[:, None]
    # dims without (effective) rotation: the tail past rotary_dim, then the slowest planes, slowest first
    flat = list(range(R, D))
    for f in range(F - 1, F - 1 - min(nope_planes, F), -1):
        flat += [f, f + F]
    if flat:  # plain PCA, whitened by the covariance of the queries reading each head
        idx = torch.tensor(flat)
        Xw = X * tw.sqrt()[:, None]
        C = Xw.T @ Xw
        qt = qa[..., idx]
        metrics = [
            sum(head_w[h] * qt[:, h].T @ qt[:, h] for h in range(Hb) if kv_local[h] == j) / X.shape[0] for j in range(r)
        ]
        W, P = shared_basis([k[j, idx] for j in range(r)], metrics, C, len(flat))
        W, P = _align_dims(W, P)
        new_k[idx] = W
        for h in range(Hb):
            new_q[h, idx] = P[int(kv_local[h])].T @ q[h, idx]
    return new_k, new_q


def _align_dims(W: torch.Tensor, P: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Re-base a full-rank shared basis so each head's map P_j is as close to identity as possible.

    The fit is unchanged (``P_j W`` is), but each new dim then carries mostly the same source dim,
    so slow RoPE planes pooled as non-rotary keep their own plane's content where they can (exact
    when one head is merged with nothing). S = argmin sum_j |P_j S - I|^2; W -> S^-1 W, P_j -> P_j S.
    """
    d = W.shape[0]
    if any(p.shape != (d, d) for p in P):
        return W, P
    Pst = torch.cat(P)
    S = torch.linalg.lstsq(Pst, torch.eye(d, dtype=F64).repeat(len(P), 1)).solution
    if torch.linalg.cond(S) > 1e8:  # heads cancel out: keep the PCA basis
        return W, P
    return torch.linalg.solve(S, W), [p @ S for p in P]


def _merge_values(v, o, C, n_q, head_w):
    """One block: v (r, Dv, in+1) augmented rows, o (hidden, Hb, Dv), C (in+1, in+1) input moment;
    head_w: (Hb,) float64 importance of each query head's output.

    Returns shared value rows (Dv, in+1) and new o columns (hidden, Hb, Dv).
    """
    r, Dv, _ = v.shape
    Hb = o.shape[1]
    kv_local = torch.arange(Hb) // n_q
    metrics = [sum(head_w[h] * o[:, h].T @ o[:, h] for h in range(Hb) if kv_local[h] == j) for j in range(r)]
    W, P = shared_basis(list(v), metrics, C, Dv)
    new_o = torch.stack([o[:, h] @ P[int(kv_local[h])] for h in range(Hb)], dim=1)
    return W, new_o


def _attention_stats(attn: AttentionWeights, x: torch.Tensor, **rope_kw):
    """Source-attention statistics on calibration windows x (B, T, hidden).

    Returns, per token and query head, ``key_w`` (N, H): the first-order sensitivity of the head's
    output to an error in that token's score, ``sum_t a(t,s) |o_h (v(s) - z_h(t))|^2`` (softmax
    derivative; a score offset shared by all keys costs nothing); and ``recv`` (N, H): the
    attention the token receives, ``sum_t a(t,s)``. Scored by blocks of query rows: every sum over t
    is accumulated block by block, so long windows never hold (H, T, T).
    """
    B, T, _ = x.shape
    inv_freq, scaling = resolve_rope(attn, rope_kw.get("inv_freq"), rope_kw.get("attention_scaling"))
    kv = attn.kv_index()
    o = attn.o.to(F64)
    M = torch.einsum("ihv,ihw->hvw", o, o)  # o-metric per query head
    key_w, recv = [], []
    for b in range(B):
        q, k = source_qk(attn, x[b], inv_freq, scaling)
        v = _values(attn, x[b])[kv]  # (H, T, Dv)
        # Per key s: sum_t a(t,s) [1, z(t), |z(t)|^2_M], with z(t) the head's output at row t.
        acc = v.new_zeros(v.shape[0], T, v.shape[-1] + 2)
        for s, e, lo, p in causal_prob_blocks(source_score_block(attn, q, k), T):
            z = p @ v[:, lo:e]  # (H, rows, Dv)
            zMz = torch.einsum("htv,hvw,htw->ht", z, M, z)
            acc[:, lo:e] += p.transpose(-1, -2) @ torch.cat([torch.ones_like(zMz)[..., None], z, zMz[..., None]], -1)
        colsum, pz, pzMz = acc[..., 0], acc[..., 1:-1], acc[..., -1]
        vMv = torch.einsum("htv,hvw,htw->ht", v, M, v)
        # sum_t a(t,s) |v(s) - z(t)|^2_M, expanded
        w = colsum * vMv - 2 * torch.einsum("htv,hvw,htw->ht", v, M, pz) + pzMz
        key_w.append(w.clamp_min(0).T)
        recv.append(colsum.T)
    return torch.cat(key_w), torch.cat(recv)


def refit_o(
    attn: AttentionWeights,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ridge: float = 0.1,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float | None = None,
) -> AttentionWeights:
    """Least-squares refit of ``o_proj`` (and its bias, if any) so the attention output on ``x`` is
    closest to ``y`` (B, T, hidden), with a ridge ``ridge * mean diag(Z^T Z)`` pulling towards the
    current ``o`` (the fit has H * Dv inputs per output: keep the ridge unless calibration is large)."""
    z = head_outputs(attn, x, inv_freq=inv_freq, attention_scaling=attention_scaling)
    Z = z.reshape(-1, attn.num_heads * attn.v_head_dim)
    O0 = attn.o.to(F64).reshape(attn.hidden_size, -1)
    if attn.o_bias is not None:
        Z = torch.cat([Z, Z.new_ones(Z.shape[0], 1)], 1)
        O0 = torch.cat([O0, attn.o_bias.to(F64)[:, None]], 1)
    O = ridge_towards(Z, y.to(F64).reshape(-1, attn.hidden_size), O0, ridge)
    new_o_bias = None
    if attn.o_bias is not None:
        O, new_o_bias = O[:, :-1], O[:, -1].to(attn.o_bias.dtype)
    return attn.with_(o=O.reshape(attn.o.shape).to(attn.o.dtype), o_bias=new_o_bias)


def nope_candidates(
    rope: RopeSpec, context: int, inv_freq: torch.Tensor | None = None, max_angle: float = math.pi / 2
) -> list[int]:
    """Counts of slowest RoPE planes worth trying as non-rotary: 0, F/16, 2F/16, ... and the number of
    planes that turn by at most ``max_angle`` over ``context`` tokens, which caps them (on SmolLM2,
    pooling planes that turn by ~1.5 rad over the evaluated length helped, by ~6 rad hurt badly).
    Steps of F/16: on SmolLM2 the best count at 4K distances is 2 or 6 in some layers."""
    inv = rope_tables(rope)[0] if inv_freq is None else inv_freq.to(F64)
    F = len(inv)
    most = int((inv * context <= max_angle).sum())
    step = max(1, F // 16)
    return sorted({0, most, *range(step, most + 1, step)})


def distance_stretch(context: int, window: int) -> int:
    """How far to stretch positions so a calibration window's distances span ``context``: RoPE
    frequencies times s score token i against token j as if they stood s * (i - j) apart."""
    return max(1, math.ceil(context / window))


@dataclass(frozen=True)
class MergeOptions:
    """How ``calibrated_merge`` fits the shared heads. The defaults are what ``--to gqa/mqa`` runs;
    the others exist for ablations (scripts/experiments/gqa_ablation.py) and tests."""

    # The slowest RoPE planes pooled with the non-rotary dims into one query-whitened PCA; None: per
    # layer, the count among ``nope_candidates(context)`` with the least mean attention-output error
    # at the calibration window's own distances and stretched to ``context``; 0: RoPE exact.
    nope_planes: int | None = None
    # the longest sequence to serve well (default: the calibration window; gqa_plan passes
    # --serve-context, else the source's max_position_embeddings)
    context: int | None = None
    values: str = "pca"  # "pca": shared basis whitened by o-projection energy; "mean": ablation
    value_tokens: str = "received"  # "received": tokens weighted by the attention they get; "tokens": not
    key_tokens: str = "attention"  # "attention": key tokens weighted by softmax sensitivity; "uniform": not
    refit: bool = True  # least-squares refit of o_proj on x (``refit_o``)
    ridge: float = 0.1  # the o refit's ridge
    regroup: bool = True  # reorder KV heads so similar heads share a block first (exact)


def _check_merge_options(attn: AttentionWeights, target: int, options: MergeOptions) -> None:
    _check_attn(attn, target)
    if attn.qk_norm_scope != "head":
        raise KvSurgeonError("calibrated merging keeps q/k norms per head; these span the whole projection "
                             "(OLMo-2): use mean_pool (--method mean)")
    for name, ok in (
        ("values", ("pca", "mean")),
        ("value_tokens", ("received", "tokens")),
        ("key_tokens", ("attention", "uniform")),
    ):
        val = getattr(options, name)
        if val not in ok:
            raise KvSurgeonError(f"{name} must be one of {ok}, got {val!r}")


def _shared_values(v: torch.Tensor, o: torch.Tensor, X: torch.Tensor, blocks: list, recv: torch.Tensor | None,
                   n_q: int, options: MergeOptions, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: one value basis per block (target, Dv, in+1); o's columns (hidden, H, Dv) absorb each
    head's reconstruction map."""
    new_v, new_o = [], torch.zeros_like(o)
    for kb, qb in blocks:
        if options.values == "mean":
            vg, og = v[kb].mean(0), o[:, qb]
        else:
            if options.value_tokens == "received":
                wv = (recv[:, qb] * head_w[qb]).sum(1)
                C = (X * (wv / wv.mean())[:, None]).T @ X
            else:
                C = X.T @ X
            vg, og = _merge_values(v[kb], o[:, qb], C, n_q, head_w[qb])
        new_v.append(vg)
        new_o[:, qb] = og
    return torch.stack(new_v), new_o


def _shared_keys(q: torch.Tensor, k: torch.Tensor, X: torch.Tensor, blocks: list, key_w: torch.Tensor | None,
                 rotary_dim: int, n_q: int, n_nope: int, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: each block's shared key (target, D, in+1) and the queries (H, D, in+1) reading it."""
    new_q, new_k = torch.zeros_like(q), []
    for kb, qb in blocks:
        tw = (key_w[:, qb] * head_w[qb]).sum(1) if key_w is not None else None
        kg, qg = _merge_keys(q[qb], k[kb], X, rotary_dim, n_q, head_w[qb], token_w=tw, nope_planes=n_nope)
        new_k.append(kg)
        new_q[qb] = qg
    return new_q, torch.stack(new_k)


def _split_bias(t: torch.Tensor, ref_w: torch.Tensor, ref_b: torch.Tensor | None):
    """Weights and bias from an augmented (..., in+1) tensor; a bias the source lacked is kept only if nonzero."""
    w, b = t[..., :-1].to(ref_w.dtype), t[..., -1]
    keep = ref_b is not None or b.abs().max() > 0
    return w, (b.to(ref_w.dtype if ref_b is None else ref_b.dtype) if keep else None)


def _assemble(attn: AttentionWeights, new_q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
              new_o: torch.Tensor) -> AttentionWeights:
    """The merged layer in the source's dtypes."""
    qw, qbias = _split_bias(new_q, attn.q, attn.q_bias)
    kw, kbias = _split_bias(new_k, attn.k, attn.k_bias)
    vw, vbias = _split_bias(new_v, attn.v, attn.v_bias)
    return attn.with_(q=qw, k=kw, v=vw, o=new_o.to(attn.o.dtype), q_bias=qbias, k_bias=kbias, v_bias=vbias)


def _least_error_nope_planes(attn: AttentionWeights, x: torch.Tensor, candidates: list[int], merge_with, y_src: torch.Tensor,
                             rope_kw: dict, stretch: int, info: dict) -> int:
    """The candidate count of pooled planes whose merge moves the attention output least (ties: fewer),
    averaged over the window's own distances and, with ``stretch`` > 1, the same tokens with positions
    stretched to the served context. Judged on the window alone, pooling more planes nearly always
    wins; on SmolLM2 MQA that choice made untrained ppl at positions 2K-4K 34.8x the source's, and
    some layers' errors grow 10-20x at 4K distances for one count and not for its neighbours."""
    scales = [(rope_kw, y_src)]
    if stretch > 1:
        inv_freq, scaling = resolve_rope(attn, rope_kw["inv_freq"], rope_kw["attention_scaling"])
        far_kw = dict(inv_freq=inv_freq * stretch, attention_scaling=scaling)
        scales.append((far_kw, attention_output(attn, x, **far_kw)))
    info["nope_errors"], info["nope_stretch"] = {}, stretch
    for n in candidates:
        cand = merge_with(n)
        errs = [relative_mse(attention_output(cand, x, **kw), y) for kw, y in scales]
        info["nope_errors"][n] = sum(errs) / len(errs)
        del cand  # keep only the errors: holding the best candidate too costs a layer's weights
    return min(info["nope_errors"], key=lambda n: (info["nope_errors"][n], n))


def calibrated_merge(
    attn: AttentionWeights,
    x: torch.Tensor,
    target: int,
    options: MergeOptions = MergeOptions(),
    *,
    y: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float | None = None,
    info: dict | None = None,
    head_weights: torch.Tensor | None = None,
) -> AttentionWeights:
    """Merge KV heads into ``target`` shared heads using calibration activations (the default method).

    x: attention inputs (hidden states after ``input_layernorm``) on calibration tokens, (B, T, hidden)
    windows starting at position 0, or (N, hidden) read as one sequence. Whether they came through
    the original or the already-converted earlier layers is the caller's choice (converted-path
    inputs measured better on SmolLM2). The window length is the context the merge is tuned for.

    Keys, per RoPE plane: best complex rank-1 fit of each block (commutes with RoPE, exact at any
    length). ``options.nope_planes`` slowest planes, whose rotation over the context is small, are
    instead pooled with the non-rotary dims into one query-whitened PCA, which may move content
    between planes (much better at short range, approximate at long range); see ``MergeOptions``
    for the rest. y: the o refit's target, by default the source layer's own attention output on x.
    inv_freq / attention_scaling: RoPE tables for the attention simulation (default: ``rope_tables``).
    info: optional dict filled with what was chosen (``nope_planes``, ``kv_order``, ``nope_errors``).
    head_weights: optional (H,) importance of each query head in the key and value fits (default: all 1),
    e.g. more for the heads that copy from far back (``retrieval_head_weights``).
    Returns weights in the input dtype with ``target`` KV heads.
    """
    _check_merge_options(attn, target, options)
    info = {} if info is None else info
    rope_kw = dict(inv_freq=inv_freq, attention_scaling=attention_scaling)
    x = _as_batch(x).to(F64)
    B, T, _ = x.shape
    X = torch.cat([x.reshape(-1, x.shape[-1]), x.new_ones(B * T, 1)], 1)  # (N, in+1): bias = input of ones

    G, R = attn.num_kv_heads, attn.rope.rotary_dim
    r, Hb = G // target, attn.num_heads // target
    n_q = attn.group_size  # query heads per source KV head
    info["kv_order"] = list(range(G))
    hw = torch.ones(attn.num_heads, dtype=F64) if head_weights is None else head_weights.to(F64)
    if options.regroup and 1 < target < G:
        info["kv_order"] = _similarity_order(attn, X, target)
        attn = permute_heads(attn, info["kv_order"])
        hw = hw[_query_order(info["kv_order"], n_q)]
    key_w = recv = None
    if options.key_tokens == "attention" or options.value_tokens == "received":
        key_w, recv = _attention_stats(attn, x, **rope_kw)
    key_w = key_w if options.key_tokens == "attention" else None

    q = _augment(attn.q, attn.q_bias)
    k = _augment(attn.k, attn.k_bias)
    blocks = [(slice(g * r, (g + 1) * r), slice(g * Hb, (g + 1) * Hb)) for g in range(target)]
    new_v, new_o = _shared_values(_augment(attn.v, attn.v_bias), attn.o.to(F64), X, blocks, recv, n_q, options, hw)

    def merge_with(n_nope: int) -> AttentionWeights:
        return _assemble(attn, *_shared_keys(q, k, X, blocks, key_w, R, n_q, n_nope, hw), new_v, new_o)

    y_src = None
    if attn.k_norm is not None:  # Qwen3: keys merged after their per-head norm (qk_norm_merge)
        # merged on the norm's effective multiplier (Gemma-3: 1 + w), stored back in the source's form
        new_k, k_norm = merge_normed_keys(k, X, [kb for kb, _ in blocks], attn.k_norm.to(F64) + attn.norm_offset,
                                          attn.norm_eps, info)
        out = _assemble(attn, q, new_k, new_v, new_o).with_(k_norm=(k_norm - attn.norm_offset).to(attn.k_norm.dtype))
        info["nope_planes"] = None
    elif options.nope_planes is None and R:
        y_src = attention_output(attn, x, **rope_kw)
        context = options.context or T
        candidates = nope_candidates(attn.rope, context, inv_freq)
        info["nope_planes"] = _least_error_nope_planes(attn, x, candidates, merge_with, y_src, rope_kw,
                                                       distance_stretch(context, T), info)
        out = merge_with(info["nope_planes"])  # deterministic: the same merge again
    else:
        info["nope_planes"] = options.nope_planes or 0
        out = merge_with(info["nope_planes"])
    if options.refit:
        if y is None:
            y = y_src if y_src is not None else attention_output(attn, x, **rope_kw)
        out = refit_o(out, x, y, ridge=options.ridge, **rope_kw)
    return out


def _similarity_order(attn: AttentionWeights, X: torch.Tensor, target: int) -> list[int]:
    """similarity_groups on calibration activations, keys weighted by query RMS and values whitened
    by o-energy, as calibrated_merge scores them."""
    R = attn.rope.rotary_dim
    kv = attn.kv_index()
    keys = torch.einsum("ni,gdi->ngd", X, _augment(attn.k, attn.k_bias))
    qa = torch.einsum("ni,hdi->nhd", X, _augment(attn.q, attn.q_bias))
    w = None
    if R:
        qpow = to_planes(qa[..., :R], R).abs().pow(2).mean(0)  # (H, F)
        w = torch.zeros(R // 2, attn.num_kv_heads, dtype=F64).index_add_(1, kv, qpow.T).sqrt()
    vals = torch.einsum("ni,gdi->ngd", X, _augment(attn.v, attn.v_bias))
    o = attn.o.to(F64)
    Ls = [
        psd_sqrt(sum(o[:, h].T @ o[:, h] for h in range(attn.num_heads) if kv[h] == j), 1e-10)[0]
        for j in range(attn.num_kv_heads)
    ]
    vals = torch.stack([vals[:, j] @ Ls[j] for j in range(attn.num_kv_heads)], 1)
    return similarity_groups(keys, target, values=vals, rotary_dim=R, key_weights=w)
