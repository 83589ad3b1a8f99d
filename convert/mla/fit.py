"""GQA/MHA -> DeepSeek MLA (``DeepseekV3ForCausalLM``): the math, one layer at a time.

Source: one layer in neutral form (``AttentionWeights``: H query heads, G KV heads, head dim D,
rotate-half RoPE). Target: ``MlaWeights`` (latent rank R, one shared rope key of Dr dims, per-head
nope dims Dn and value dims Dv). Steps, each exact when nothing is dropped:

1. RoRoPE. Per rotary frequency f, a complex G x G map across the KV heads (a PCA of calibration
   keys weighted by the RMS of the queries reading each head; ``rope_planes``) commutes with RoPE.
   Component 0 of each *kept* frequency becomes the shared rope key (Dr/2 frequencies); every other
   component (and every component of a frequency that is not kept, and the non-rotary tail of
   partial-RoPE heads) loses RoPE and becomes a "nope" key dim. Each query head gets the matching
   rotated query rows. Losing RoPE is the first lossy step.
   Kept frequencies: with default RoPE a rope dim Dr has ``inv_freq_i = theta' ** (-2 i / Dr)``, so
   the kept set is ``{i * s}`` for a stride s, with ``theta' = theta ** (s * Dr / rotary_dim)``
   (``"high"``: s = 1, the Dr/2 fastest frequencies; ``"spread"``: s = rotary_dim / Dr, every s-th
   frequency, ``theta' = theta``).
2. Joint latent. The nope keys of all G components and the values of all G heads are stacked,
   ``Z = [K_nope; V] = W x``, and replaced by ``B c`` with ``c = A x`` of rank R:
   ``calibrated`` - PCA of ``S W x`` over calibration inputs with S a metric: K and V balanced so
   their energies match (x ``kv_balance``), optionally whitened by the queries reading the keys
   (score error) and by ``o_proj`` (output error); ``svd`` - the weight-only baseline (MHA2MLA
   style): SVD of the stacked, norm-balanced ``[W_k_nope; W_v]`` (no activations; the RoRoPE basis
   is then an unweighted PCA of the key *weights*, i.e. isotropic inputs).
3. kv_a_layernorm. transformers always applies ``c / rms(c) * w`` (eps 1e-6) before kv_b_proj.
   The latent basis is rescaled per coordinate (``c = diag(s) y``) so that ``rms(c)`` is as
   constant as possible over calibration tokens (non-negative least squares on ``s**2``,
   reweighted to the error of the normalisation factor: tokens whose latent is far too small, the
   attention sinks, dominate the damage), scaled to mean rms 1 (so the eps, 1e-6 here and
   ``rms_norm_eps`` in vLLM, is negligible), and ``w = r0 / s`` undoes both. ``norm_ballast``
   latent dims carry input directions concentrated on the tokens whose latent is too small (one
   dim fixes the sinks: on SmolLM2 it takes -50% ppl from 26.5 to 17.5). The residual (coefficient
   of variation of rms(c)) is measured, and kv_b_proj is refit by least squares on the actually
   normalised latent. A rotation inside the latent cannot help: rms(c) is rotation invariant.
4. Assembly: per head ``q = [q_nope | q_rope]``, ``kv_b = [k_nope_b | v_b]``. With R <= |K_nope|
   every head's k_nope is the latent itself (kv_b rows = identity) and the key map is absorbed
   into the query (``q_nope_h = B_k^T Q_h``), else ``kv_b`` holds ``B_k`` and ``q_nope_h = Q_h``:
   both exact, ``Dn = min(R, |K_nope|)``. Values: ``kv_b_v[h] = B_v[kv head of h]``, ``o``
   unchanged, ``Dv = D``. The softmax scale ``(Dn + Dr) ** -0.5`` of DeepseekV3 replaces the
   source's ``D ** -0.5`` by multiplying q by ``sqrt((Dn + Dr) / D)``; the rope rows of q and
   ``k_pe`` are permuted to interleaved order (``rope_interleave: true``).

Optional calibration refits (closed-form least squares, layer-local; the cache is unchanged):
``token_weights`` (``attention_token_weights``: how much attention each token receives) weight
the joint PCA and the kv_b refit; ``refit_queries`` fits q_proj to reproduce the source scores
against the converted keys; ``refit_output`` fits o_proj to reproduce the source layer's output.

Biases (Qwen2): the key bias of nope dims adds a per-query constant to every score (softmax drops
it, exact); of rope dims it becomes the rope rows of ``kv_a_proj_with_mqa.bias``; the value bias
adds ``o_h v_bias`` to the output whatever the attention weights (folded into ``o_proj.bias``,
exact). DeepseekV3's ``q_proj`` has no bias: a query bias is refused unless ``q_bias="fit"``
(least-squares fold into the weights using calibration inputs, lossy, residual reported).
Per-head q/k RMSNorm (Qwen3): DeepSeek MLA has no per-head norm, so ``linearize_qk_norm`` replaces
it by least-squares linear maps fitted on calibration inputs (``--qk-norm fit``, lossy; exact only
where every head's pre-norm rms is constant over the inputs); the refits then target the real,
normed source. Without the flag it is refused.

Reading order: the shape checks and RoPE frequency plan; ``rorope_basis``; the latent norm's
scales (``fit_latent_scales``, ballast directions); ``MlaFit`` (the fit's options) and
``joint_latent_plan`` (steps 1-2 up to the PCA); ``convert_layer_to_mla`` (steps 2-4, one small
helper per step); the refits (``attention_token_weights``, ``refit_output``, ``refit_queries``).
The plan that drives them per layer is ``plan.py``; helpers only experiments and tests use
(``mla_config``, ``mla_state_dict``, per-layer ranks) are in ``scripts/experiments/mla_tools.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsurgeon.attention.mla_layout import MlaWeights, interleaved_to_rotate_half, rotate_half_to_interleaved
from kvsurgeon.attention.neutral import AttentionWeights, RopeSpec
from kvsurgeon.attention.reference import (
    apply_rope,
    attention_output,
    latent_rms,
    mla_head_outputs,
    mla_rope,
    received_attention,
    resolve_rope,
    rms_norm,
    rope_cos_sin,
    rope_tables,
    source_qk,
)

from ..errors import KvSurgeonError
from ..linalg import psd_sqrt, relative_mse, ridge_solve, ridge_towards, spd_solve
from ..rope_planes import pca_basis, plane_covariance, rotate_keys, rotate_queries

__all__ = [
    "MlaConversionError",
    "MlaFit",
    "JointLatentPlan",
    "check_mla_ranks",
    "rope_frequency_plan",
    "dropped_rope_reach",
    "rorope_basis",
    "fit_latent_scales",
    "joint_latent_plan",
    "convert_layer_to_mla",
    "attention_token_weights",
    "refit_output",
    "refit_queries",
    "linearize_qk_norm",
]



class MlaConversionError(KvSurgeonError):
    pass


# ---------------------------------------------------------------------------------------------
# checks and the RoPE plan


def _stride(rotary_dim: int, rope_dim: int, frequencies: str | int) -> int:
    F, n = rotary_dim // 2, rope_dim // 2
    if frequencies == "high":
        return 1
    if frequencies == "spread":
        if F % n:
            raise MlaConversionError(
                f"rope dim {rope_dim} cannot spread evenly over the source's {F} rotary frequencies "
                f"(rotary_dim {rotary_dim} must be a multiple of the rope dim); use frequencies='high', "
                f"an integer stride, or a rope dim dividing {rotary_dim}"
            )
        return F // n
    if isinstance(frequencies, int) and not isinstance(frequencies, bool) and frequencies >= 1:
        if (n - 1) * frequencies >= F:
            raise MlaConversionError(
                f"frequency stride {frequencies} with rope dim {rope_dim} needs {(n - 1) * frequencies + 1} "
                f"frequencies but the source has {F} (rotary_dim {rotary_dim}); use a smaller stride"
            )
        return frequencies
    raise MlaConversionError(f"frequencies must be 'high', 'spread' or a positive integer stride, got {frequencies!r}")


def check_mla_ranks(
    *,
    num_kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    rope: RopeSpec,
    kv_lora_rank: int,
    rope_dim: int,
    hidden_size: int | None = None,
    frequencies: str | int = "high",
) -> None:
    """Raise ``MlaConversionError`` (a ``KvSurgeonError``) naming the problem and the fix when the
    requested MLA shape cannot be built from the source."""
    G, D, Dv = num_kv_heads, head_dim, v_head_dim
    if not isinstance(rope_dim, int) or rope_dim < 2:
        raise MlaConversionError(f"qk_rope_head_dim (Dr) must be an even integer >= 2, got {rope_dim!r}")
    if rope_dim % 2:
        raise MlaConversionError(
            f"qk_rope_head_dim (Dr) = {rope_dim} is odd: RoPE rotates pairs of dims; pick an even Dr "
            f"(e.g. {rope_dim - 1} or {rope_dim + 1})"
        )
    if rope_dim > D:
        raise MlaConversionError(
            f"qk_rope_head_dim (Dr) = {rope_dim} is above the source head_dim {D}: the shared rope key "
            f"holds at most one component per source frequency; use Dr <= {D}"
        )
    if rope_dim > rope.rotary_dim:
        raise MlaConversionError(
            f"qk_rope_head_dim (Dr) = {rope_dim} is not possible with the source's rotary dim "
            f"{rope.rotary_dim} (partial_rotary_factor {rope.partial_rotary_factor:g}): only {rope.rotary_dim} "
            f"dims of each head rotate; use Dr <= {rope.rotary_dim}"
        )
    if rope.rope_type != "default" and rope_dim != rope.rotary_dim:
        raise MlaConversionError(
            f"the source uses rope_type {rope.rope_type!r}: its frequencies can only be reproduced with "
            f"Dr = rotary_dim = {rope.rotary_dim} (and the same rope_parameters), got Dr = {rope_dim}"
        )
    _stride(rope.rotary_dim, rope_dim, frequencies)
    joint = (G * D - rope_dim) + G * Dv
    if not isinstance(kv_lora_rank, int) or kv_lora_rank < 1:
        raise MlaConversionError(f"kv_lora_rank (R) must be a positive integer, got {kv_lora_rank!r}")
    if kv_lora_rank > joint:
        raise MlaConversionError(
            f"kv_lora_rank (R) = {kv_lora_rank} is above the joint [K_nope; V] dimension {joint} "
            f"(= {G} KV heads x {D} key dims - Dr {rope_dim} + {G} x {Dv} value dims): nothing left to "
            f"compress; use R <= {joint}"
        )
    if hidden_size is not None and kv_lora_rank > hidden_size:
        raise MlaConversionError(
            f"kv_lora_rank (R) = {kv_lora_rank} is above hidden_size {hidden_size}: the latent is a linear "
            f"map of the hidden state, so at most {hidden_size} dims carry information; use R <= {hidden_size}"
        )


def rope_frequency_plan(rope: RopeSpec, rope_dim: int, frequencies: str | int = "high") -> tuple[list[int], float]:
    """Source frequency indices kept in the shared rope key, and the MLA ``rope_theta`` that
    reproduces them exactly with default RoPE over Dr dims."""
    s = _stride(rope.rotary_dim, rope_dim, frequencies)
    kept = [i * s for i in range(rope_dim // 2)]
    if rope.rope_type != "default":
        return kept, rope.theta  # Dr == rotary_dim, s == 1: rope_parameters are copied
    return kept, float(rope.theta ** (s * rope_dim / rope.rotary_dim))


def dropped_rope_reach(rope: RopeSpec, rope_dim: int, frequencies: str | int = "high") -> float | None:
    """Tokens over which the fastest rotary frequency the shared rope key drops turns one radian (None: none is
    dropped). Beyond about that distance those dims, now nope, no longer tell near from far: with SmolLM2's 16
    slowest frequencies unrotated (reach 316 tokens) the source itself retrieves nothing at 1K; with its 8
    slowest (reach 5,623) it keeps its 4K passkey (BENCHMARKS.md, "The dropped frequencies alone")."""
    kept = set(rope_frequency_plan(rope, rope_dim, frequencies)[0])
    inv = rope.inv_freq()
    dropped = [float(inv[i]) for i in range(len(inv)) if i not in kept]
    return 1 / max(dropped) if dropped else None


def _check_supported(attn: AttentionWeights, q_bias: str) -> None:
    if attn.q_norm is not None or attn.k_norm is not None:
        raise MlaConversionError(
            "the source applies a per-head q/k RMSNorm (Qwen3), which does not survive mixing heads into one "
            "latent. Pass --qk-norm fit (Python: linearize_qk_norm first) to replace it by least-squares linear "
            "fits on calibration inputs (lossy), or convert to GQA or hybrid instead."
        )
    if attn.q_bias is not None and q_bias != "fit":
        raise MlaConversionError(
            "the source's q_proj has a bias but DeepseekV3's q_proj has none (attention_bias only adds "
            "kv_a_proj_with_mqa and o_proj biases). Pass --q-bias fit (Python: q_bias='fit') to fold it into the weights by least "
            "squares on calibration inputs (lossy; the residual is reported)."
        )


# ---------------------------------------------------------------------------------------------
# small linear-algebra helpers (float64)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.reshape(-1, x.shape[-1]).double()


def _second_moment(X: torch.Tensor | None, hidden: int) -> torch.Tensor:
    if X is None:
        return torch.eye(hidden, dtype=torch.float64)
    return X.T @ X / X.shape[0]


def _head_moments(q: torch.Tensor, X: torch.Tensor | None, Sx: torch.Tensor) -> torch.Tensor:
    """(H, D, D) per-head query second moments q_h Sx q_h^T, through the N inputs X (Sx = X^T X / N)
    when given: N x hidden per head instead of hidden x hidden."""
    if X is not None:
        qx = torch.einsum("hdi,ni->hdn", q, X)
        return qx @ qx.transpose(1, 2) / X.shape[0]
    return torch.einsum("hdi,ij,hej->hde", q, Sx, q)


# ---------------------------------------------------------------------------------------------
# RoRoPE


def rorope_basis(
    k: torch.Tensor,
    q: torch.Tensor,
    kv_index: torch.Tensor,
    rotary_dim: int,
    x: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    q_bias: torch.Tensor | None = None,
    query_weighted: bool = True,
    head_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency basis ``A`` (F, G, G) across KV heads and ``inv(A)``: PCA of keys computed from
    calibration inputs ``x`` (N, hidden), each head weighted by the RMS of the queries reading it
    in that frequency. ``x=None``: isotropic inputs (a PCA of the key weights themselves).
    head_weights: (H,) importance of each query head's energy in that RMS (None: alike)."""
    G, D, hidden = k.shape
    X = _flat(x) if x is not None else torch.eye(hidden, dtype=torch.float64)
    keys = torch.einsum("gdi,ni->ngd", k.double(), X)
    if k_bias is not None and x is not None:
        keys = keys + k_bias.double()
    cov = plane_covariance(keys, rotary_dim)
    weights = None
    if query_weighted:
        F = rotary_dim // 2
        qa = torch.einsum("hdi,ni->nhd", q[:, :rotary_dim].double(), X)
        if q_bias is not None and x is not None:
            qa = qa + q_bias[:, :rotary_dim].double()
        e = (qa[..., :F] ** 2 + qa[..., F:] ** 2).mean(0)  # (H, F)
        if head_weights is not None:
            e = e * head_weights.double()[:, None]
        w = torch.zeros(G, F, dtype=torch.float64)
        w.index_add_(0, kv_index, e)
        w = (w / torch.bincount(kv_index, minlength=G)[:, None]).sqrt()
        weights = w.T  # (F, G)
    return pca_basis(cov, weights)


# ---------------------------------------------------------------------------------------------
# the latent RMSNorm


def fit_latent_scales(
    y: torch.Tensor, floor: float = 1e-2, iters: int = 2000, irls: int = 4, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-negative per-coordinate weights ``a`` (R,) making ``f_t = sum_i a_i y_ti**2`` (R x the
    squared rms of the scaled latent ``sqrt(a) * y``) as constant as possible over tokens.

    What matters is the error of the normalisation factor ``sqrt(mean f / f_t) - 1`` (a token whose
    latent is 8x too small gets its keys and values scaled 8x, e.g. attention sinks), so the
    weighted least squares ``min sum_t u_t (f_t - R)**2`` (accelerated projected gradient, ``a_i *
    mean(y_i**2) >= floor``) is reweighted ``irls`` times to that error. Use ``s = sqrt(a)``.
    """
    P = y.double() ** 2
    m = P.mean(0).clamp_min(1e-300)
    Pn = P / m  # every coordinate has mean 1; a uniform a_tilde = 1 is the unscaled latent
    N, R = Pn.shape
    u0 = torch.ones(N, dtype=torch.float64) if token_weights is None else token_weights.double()
    u = u0.clone()
    a = torch.ones(R, dtype=torch.float64)
    for _ in range(max(1, irls)):
        Gm = (Pn * u[:, None]).T @ Pn / u.sum()
        b = (Pn * u[:, None]).sum(0) * (R / u.sum())
        Lip = float(torch.linalg.eigvalsh(Gm).max()).__abs__() + 1e-300
        z, t = a.clone(), 1.0
        for _ in range(iters):
            a_new = (z - (Gm @ z - b) / Lip).clamp_min(floor)
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            z = a_new + ((t - 1) / t_new) * (a_new - a)
            a, t = a_new, t_new
        f = (Pn @ a).clamp_min(1e-12)
        f = f / f.mean()
        f_plain = Pn @ m  # the unscaled latent (a = 1): keep it if the fit did not beat it
        f_plain = f_plain / f_plain.mean()
        if float((u0 * (f_plain.rsqrt() - 1) ** 2).sum()) <= float((u0 * (f.rsqrt() - 1) ** 2).sum()):
            a, f = m.clone(), f_plain
        r = f - 1
        e = f.rsqrt() - 1
        ratio = torch.where(r.abs() > 1e-6, e / r.where(r.abs() > 1e-6, torch.ones_like(r)), torch.full_like(r, -0.5))
        u = u0 * ratio.pow(2)
    return a / m


def _ballast_direction(X: torch.Tensor, A: torch.Tensor, deficit: torch.Tensor) -> torch.Tensor:
    """A unit input direction (hidden,) outside the row space of A whose energy is concentrated on
    the tokens whose latent is too small: max_d sum_t deficit_t (d.x_t)^2 / sum_t (d.x_t)^2
    (with a ridge of 1e-6 x the mean diagonal of Sx = X^T X / N)."""
    N, hidden = X.shape
    Q, _ = torch.linalg.qr(A.T)  # (hidden, r) orthonormal basis of the row space
    eps = 1e-6 * float(X.pow(2).sum()) / (N * hidden)
    if N < hidden:
        # Fewer tokens than dims: the optimum lies in the span of the projected tokens Z = X Pc, so the
        # same generalised eigenproblem is solved in token space (N x N) instead of hidden x hidden
        # (at 8B the latter was two 4096^2 eigendecompositions and six 4096^3 products per layer).
        Z = X - (X @ Q) @ Q.T
        lam, U = torch.linalg.eigh(Z @ Z.T)
        keep = lam > 1e-12 * lam.max().clamp_min(1e-300)
        lam, U = lam[keep], U[:, keep]
        den = (lam * lam + N * eps * lam).sqrt()  # d = Z^T U beta, d^T Cx d = |den * beta|^2 / N
        L = U * (lam / den)
        _, V = torch.linalg.eigh(L.T @ (deficit[:, None] * L))
        d = Z.T @ (U @ (V[:, -1] / den))
    else:
        Pc = torch.eye(hidden, dtype=torch.float64) - Q @ Q.T
        Cd = Pc @ ((X * deficit[:, None]).T @ X / N) @ Pc
        Cx = Pc @ (X.T @ X / N) @ Pc + eps * torch.eye(hidden, dtype=torch.float64)
        _, Cx_isqrt = psd_sqrt(Cx)
        _, V = torch.linalg.eigh(Cx_isqrt @ Cd @ Cx_isqrt)
        d = Pc @ (Cx_isqrt @ V[:, -1])
    return d / d.norm().clamp_min(1e-300)


# ---------------------------------------------------------------------------------------------
# the conversion


@dataclass(frozen=True)
class MlaFit:
    """How ``convert_layer_to_mla`` fits one layer. ``mla_plan`` sets the first group from
    ``MlaTuning``; the switches after it exist for ablations (scripts/experiments/mla_ablation.py)
    and tests, and every conversion the CLI runs keeps their defaults."""

    qk_nope_head_dim: int | None = None  # None: min(R, |K_nope|), the exact choice
    kv_balance: float = 1.0  # K/V energy ratio in the joint PCA
    norm_ballast: int = 0  # latent dims that only steady rms(latent) (attention sinks)
    q_bias: str = "error"  # "fit": fold a source query bias into q_proj by least squares
    frequencies: str | int = "high"  # which source RoPE frequencies the shared rope key keeps
    # ablation switches
    whiten: bool = True  # metric from the queries reading the keys and o_proj reading the values
    norm_fit: bool = True  # per-coordinate latent scales that steady rms(latent)
    refit: bool = True  # kv_b least squares on the normalised latent
    effective_rank: int | None = None  # use only this many latent dims (per-layer ranks)
    rope_interleave: bool = True  # rope rows in interleaved pair order (``rope_interleave: true``)


@dataclass
class JointLatentPlan:
    """What the joint latent has to carry, before any rank is chosen."""

    kept: list[int]
    rope_theta: float
    rope_rows: torch.Tensor  # (Dr,) rows of component 0 that stay rotary (rotate-half order)
    k_pe: torch.Tensor  # (Dr, hidden)
    q_rope: torch.Tensor  # (H, Dr, hidden)
    k_pe_bias: torch.Tensor | None
    Wk: torch.Tensor  # (Kn, hidden) nope key rows (rotated components)
    Cn: torch.Tensor  # (H, Kn, D) the query rows reading them, as maps of each head's own rows:
    # Qn[h] = Cn[h] @ q[h]. At 8B, Qn itself (H, Kn, hidden) float64 is 1 GB; Cn is 31 MB.
    Wv: torch.Tensor  # (G*Dv, hidden)
    S: torch.Tensor  # (Kn + G*Dv, Kn + G*Dv) metric applied before the PCA
    S_inv: torch.Tensor
    Sx: torch.Tensor  # (hidden, hidden) input second moment (identity for svd)
    evals: torch.Tensor  # descending eigenvalues of the metric-weighted joint covariance
    U: torch.Tensor  # eigenvectors (columns), same order
    q: torch.Tensor  # query weights after a q-bias fold
    info: dict = field(default_factory=dict)


def _calibration_inputs(attn: AttentionWeights, x: torch.Tensor | None, method: str, q_bias: str) -> torch.Tensor | None:
    """x flattened to (N, hidden) float64, after checking the method and the source can use it."""
    if method not in ("calibrated", "svd"):
        raise MlaConversionError(f"method must be 'calibrated' or 'svd', got {method!r}")
    _check_supported(attn, q_bias)
    X = _flat(x)
    if method == "calibrated" and X is None:
        raise MlaConversionError("method='calibrated' needs calibration attention inputs x (N, hidden); use method='svd' without them")
    return X


def _fold_q_bias(attn: AttentionWeights, X: torch.Tensor | None, info: dict) -> torch.Tensor:
    """Query weights (H, D, hidden) float64, a query bias folded in: x . beta ~= 1 on the inputs."""
    q = attn.q.double()
    if attn.q_bias is not None:  # q_bias == "fit" (checked)
        if X is None:
            raise MlaConversionError("q_bias='fit' needs calibration inputs x")
        Sx_ = X.T @ X / X.shape[0]
        beta = ridge_solve(Sx_, X.mean(0), 1e-6)
        q = q + attn.q_bias.double()[..., None] * beta
        info["q_bias_fit_residual"] = float(((X @ beta - 1) ** 2).mean())
    return q


def _nope_index(G: int, D: int, rope_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(component, dim) of every rotated key row that is not the shared rope key: component 0's
    rope rows stay rotary, everything else becomes a nope key dim, ordered by component, then dim."""
    is_rope = torch.zeros(G, D, dtype=torch.bool)
    is_rope[0, rope_rows] = True
    nope = [(m, d) for m in range(G) for d in range(D) if not is_rope[m, d]]
    mi = torch.tensor([p[0] for p in nope], dtype=torch.long)
    di = torch.tensor([p[1] for p in nope], dtype=torch.long)
    return mi, di


def _value_metric(o: torch.Tensor, kv_index: torch.Tensor, G: int, Dv: int, head_w: torch.Tensor) -> torch.Tensor:
    """(G*Dv, G*Dv) block diagonal: per KV head, the o_proj energy of the query heads reading it, each
    counted ``head_w[h]`` times."""
    Mv = torch.zeros(G * Dv, G * Dv, dtype=torch.float64)
    for h in range(o.shape[1]):
        j = int(kv_index[h])
        Mv[j * Dv:(j + 1) * Dv, j * Dv:(j + 1) * Dv] += float(head_w[h]) * (o[:, h].T @ o[:, h])
    return Mv


def _whitening(attn: AttentionWeights, q: torch.Tensor, X: torch.Tensor, Sx: torch.Tensor, Cn: torch.Tensor,
               Kn: int, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key and value metrics and their inverses: nope keys by the queries reading them (score
    error), values by o_proj (output error); query head h's errors count ``head_w[h]`` times in both."""
    H, D, hidden = attn.q.shape
    # sum_h w_h Qn_h Sx Qn_h^T = sum_h w_h Cn_h (q_h Sx q_h^T) Cn_h^T: (D, D) per head, with the input
    # moment applied through X when there are fewer tokens than hidden dims
    Sq = _head_moments(q, X if X.shape[0] < hidden else None, Sx) * head_w.double()[:, None, None]
    Mk = torch.einsum("hkd,hde,hle->kl", Cn, Sq, Cn) / D if Kn else Cn.new_zeros(0, 0)
    Mv = _value_metric(attn.o.double(), attn.kv_index(), attn.num_kv_heads, attn.v_head_dim, head_w)
    Sk, Sk_inv = psd_sqrt(Mk) if Kn else (Mk, Mk)
    Svm, Sv_inv = psd_sqrt(Mv)
    return Sk, Sk_inv, Svm, Sv_inv


def _balanced_metric(Sk: torch.Tensor, Sk_inv: torch.Tensor, Svm: torch.Tensor, Sv_inv: torch.Tensor, Wk: torch.Tensor,
                     Wv: torch.Tensor, Sx_kv: torch.Tensor, kv_balance: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """block_diag(alpha Sk, Sv) and its inverse, alpha making the key energy kv_balance x the value energy."""
    Kn = Wk.shape[0]
    ek = float(torch.trace(Sk @ Wk @ Sx_kv @ Wk.T @ Sk)) if Kn else 0.0
    ev = float(torch.trace(Svm @ Wv @ Sx_kv @ Wv.T @ Svm))
    alpha = math.sqrt(kv_balance * ev / ek) if ek > 1e-18 * ev else 1.0  # no nope-key energy: nothing to balance
    return torch.block_diag(alpha * Sk, Svm), torch.block_diag(Sk_inv / alpha, Sv_inv), alpha


def _descending_pca(S: torch.Tensor, W: torch.Tensor, Sx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of S W Sx W^T S."""
    C = S @ W @ Sx @ W.T @ S
    evals, U = torch.linalg.eigh(0.5 * (C + C.T))
    return evals.flip(0).clamp_min(0), U.flip(1)


def joint_latent_plan(
    attn: AttentionWeights,
    x: torch.Tensor | None,
    rope_dim: int,
    method: str,
    fit: MlaFit = MlaFit(),
    token_weights: torch.Tensor | None = None,
    head_weights: torch.Tensor | None = None,
) -> JointLatentPlan:
    """RoRoPE and the metric-weighted joint [K_nope; V] covariance the latent keeps the top R of.
    head_weights: (H,) importance of each query head in the calibrated RoRoPE and whitening (None: alike)."""
    X = _calibration_inputs(attn, x, method, fit.q_bias)
    H, D, hidden = attn.q.shape
    G, Dv, rd = attn.num_kv_heads, attn.v_head_dim, attn.rope.rotary_dim
    F = rd // 2
    kv_index = attn.kv_index()
    info: dict[str, Any] = {}
    q = _fold_q_bias(attn, X, info)

    kept, theta = rope_frequency_plan(attn.rope, rope_dim, fit.frequencies)
    calibrated = method == "calibrated"
    A, A_inv = rorope_basis(
        attn.k, q, kv_index, rd, X if calibrated else None, attn.k_bias, None, query_weighted=calibrated,
        head_weights=head_weights,
    )
    kr = rotate_keys(attn.k.double(), A, rd)  # (G, D, hidden)
    kept_t = torch.tensor(kept, dtype=torch.long)
    rope_rows = torch.cat([kept_t, kept_t + F])
    k_pe_bias = None
    if attn.k_bias is not None:
        kb = rotate_keys(attn.k_bias.double()[..., None], A, rd)[..., 0]  # (G, D)
        k_pe_bias = kb[0, rope_rows]

    mi, di = _nope_index(G, D, rope_rows)
    Wk = kr[mi, di] if len(mi) else kr.new_zeros(0, hidden)
    # The query rotation is linear in each head's own D rows, the same for every hidden column: rotate
    # the identity once to get its coefficients, never the (H, G, D, hidden) rows themselves.
    eye = torch.eye(D, dtype=torch.float64).expand(H, D, D)
    C = rotate_queries(eye, A_inv, kv_index, rd)  # (H, G, D, D): rotated rows = C[h, m] @ q[h]
    Cn = C[:, mi, di]  # (H, Kn, D), nope is ordered by component, then dim
    q_rope = torch.einsum("hrd,hdi->hri", C[:, 0, rope_rows], q)
    del C
    Wv = attn.v.double().reshape(G * Dv, hidden)
    Kn = Wk.shape[0]

    Sx = _second_moment(X if calibrated else None, hidden)
    Sx_kv = Sx  # the joint PCA's input moment: tokens weighted by importance if given
    if calibrated and token_weights is not None:
        u = token_weights.reshape(-1).double()
        Sx_kv = (X * u[:, None]).T @ X / u.sum()
    if fit.whiten and calibrated:
        Sk, Sk_inv, Svm, Sv_inv = _whitening(attn, q, X, Sx, Cn, Kn,
                                             torch.ones(H) if head_weights is None else head_weights)
    else:
        Sk, Sk_inv = torch.eye(Kn, dtype=torch.float64), torch.eye(Kn, dtype=torch.float64)
        Svm, Sv_inv = torch.eye(G * Dv, dtype=torch.float64), torch.eye(G * Dv, dtype=torch.float64)
    S, S_inv, alpha = _balanced_metric(Sk, Sk_inv, Svm, Sv_inv, Wk, Wv, Sx_kv, fit.kv_balance)
    evals, U = _descending_pca(S, torch.cat([Wk, Wv]), Sx_kv)
    if attn.rope.rope_type != "default":  # Dr == rotary_dim: the config copies the source's rope_parameters
        info.update(rope_type=attn.rope.rope_type, rope_scaling=dict(attn.rope.scaling))
    info.update(rope_theta=theta, kept_frequencies=kept, nope_dims=Kn, kv_alpha=alpha)
    return JointLatentPlan(kept, theta, rope_rows, kr[0, rope_rows], q_rope, k_pe_bias, Wk, Cn, Wv, S, S_inv, Sx,
                           evals, U, q, info)


@dataclass
class _LatentNorm:
    """The latent down-projection and kv_a_layernorm: ``c = A x``, normalised ``w * c / rms(c)``."""

    A: torch.Tensor  # (R, hidden) scaled rows: K/V dims, then ballast dims, then zero rows
    s: torch.Tensor  # (R,) per-coordinate scales (c = diag(s) y)
    w: torch.Tensor  # (R,) the norm weight
    r0: float
    used: int  # latent dims carrying K/V or ballast


def _latent_dims(R: int, effective_rank: int | None, norm_ballast: int) -> int:
    """Latent dims that carry K/V: the effective rank less the ballast dims."""
    r = R if effective_rank is None else int(effective_rank)
    if not 1 <= r <= R:
        raise MlaConversionError(f"effective_rank must be in 1..kv_lora_rank={R}, got {effective_rank}")
    if norm_ballast < 0 or norm_ballast >= r:
        raise MlaConversionError(f"norm_ballast must be in 0..{r - 1} (it takes latent dims from K/V), got {norm_ballast}")
    return r - norm_ballast


def _latent_basis(p: JointLatentPlan, W: torch.Tensor, r: int, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 (R, hidden), B0 (|W|, R) of the top r PCA dims: y = U_r^T S W x ; Z ~= S^-1 U_r y (other dims zero)."""
    hidden = W.shape[1]
    Ur = p.U[:, :r]
    A0 = torch.zeros(R, hidden, dtype=torch.float64)
    A0[:r] = Ur.T @ p.S @ W
    B0 = torch.zeros(W.shape[0], R, dtype=torch.float64)
    B0[:, :r] = p.S_inv @ Ur
    return A0, B0


def _steadying_scales(X: torch.Tensor, A0: torch.Tensor, Y: torch.Tensor, r: int,
                      norm_ballast: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scales s (R,) steadying rms(diag(s) y) for the latent Y = X A0^T, adding up to
    ``norm_ballast`` ballast rows to A0 (in place) after the r K/V rows. Returns s, the latent and
    the dims in use."""
    R = A0.shape[0]
    s = torch.ones(R, dtype=torch.float64)
    s[:r] = fit_latent_scales(Y[:, :r]).sqrt()
    used = r
    for _ in range(min(norm_ballast, R - r)):  # extra latent rows that only steady rms(c) (kv_b columns start at zero)
        f = (Y[:, :used] * s[:used]).pow(2).sum(-1)
        deficit = (1 - f / f.mean()).clamp_min(0)
        A0[used] = _ballast_direction(X, A0[:used], deficit)
        Y = X @ A0.T
        used += 1
        s[:used] = fit_latent_scales(Y[:, :used]).sqrt()
    return s, Y, used


def _norm_gain(Y: torch.Tensor, s: torch.Tensor, r: int, used: int, info: dict) -> tuple[torch.Tensor, float]:
    """s rescaled so the mean rms**2 over the used dims is 1, and the least-squares gain r0 with
    ``c * r0 / rms(c) ~= c`` over the K/V dims."""
    c = Y * s
    s = s / c[:, :used].pow(2).mean(-1).mean().sqrt()
    c = Y * s
    rho = latent_rms(c)
    csq = c[:, :r].pow(2).sum(-1)
    r0 = float((csq / rho).sum() / (csq / rho.pow(2)).sum())
    info["rms_cv"] = _cv(rho)
    return s, r0


def _fit_latent_norm(X: torch.Tensor | None, A0: torch.Tensor, r: int, norm_ballast: int, norm_fit: bool,
                     info: dict) -> _LatentNorm:
    """The latent RMSNorm: c = diag(s) y, w = r0 / s, rms(c) ~ 1."""
    R = A0.shape[0]
    s = torch.ones(R, dtype=torch.float64)
    used = r  # latent dims carrying K/V (plus ballast dims, which only steady the norm)
    if X is not None:
        Y = X @ A0.T
        info["rms_cv_unscaled"] = _cv(latent_rms(Y[:, :r] / Y[:, :r].pow(2).mean().sqrt()))
        if norm_fit:
            s, Y, used = _steadying_scales(X, A0, Y, r, norm_ballast)
        s, r0 = _norm_gain(Y, s, r, used, info)
        info["norm_ballast"] = used - r
    else:  # isotropic unit-rms inputs: E ||A0 x||^2 = ||A0||_F^2
        s = s * math.sqrt(R / float(A0[:r].pow(2).sum()))
        r0 = 1.0
    s[used:] = 1.0
    w = r0 / s
    w[r:] = 0.0  # ballast and unused rows feed nothing (the refit below may use the ballast rows)
    info["norm_r0"] = r0
    return _LatentNorm(A=s[:, None] * A0, s=s, w=w, r0=r0, used=used)


def _refit_kv_b(X: torch.Tensor, W: torch.Tensor, n: _LatentNorm, u: torch.Tensor | None) -> torch.Tensor:
    """kv_b (|W|, R) by (token-weighted) least squares on the actually normalised latent, ballast
    dims included, unused dims zero."""
    R = n.A.shape[0]
    c = X @ n.A.T
    ct = torch.where(torch.arange(R) < n.used, n.r0 / n.s, torch.zeros(R, dtype=torch.float64)) * c / latent_rms(c)[:, None]
    Z = X @ W.T
    ctw = ct if u is None else ct * u[:, None]
    G_ = ctw.T @ ct
    B = ridge_solve(G_, ctw.T @ Z, 1e-12).T
    B[:, n.used:] = 0.0
    return B


def _kv_errors(X: torch.Tensor, n: _LatentNorm, W: torch.Tensor, B: torch.Tensor, Kn: int) -> dict:
    """Relative squared errors of the nope keys and the values through the normalised latent."""
    c = X @ n.A.T
    ct = n.w * c / latent_rms(c)[:, None]
    Z, fit = X @ W.T, ct @ B.T
    out = {}
    if Kn:
        out["k_nope_rel_err"] = relative_mse(fit[:, :Kn], Z[:, :Kn])
    out["v_rel_err"] = relative_mse(fit[:, Kn:], Z[:, Kn:])
    return out


def _nope_queries(p: JointLatentPlan, Bk: torch.Tensor, R: int, Dn: int, Dq: int, scale: float,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q (H, Dq, hidden) in ``out_dtype`` with its nope rows filled (scaled), and kv_b's key part
    (H, Dn, R). Float64 math one head at a time: at 8B a float64 (H, Dq, hidden) q is ~0.5 GB."""
    H, D, hidden = p.q.shape
    Kn = Bk.shape[0]
    exact_dn = min(R, Kn)
    q_out = torch.zeros(H, Dq, hidden, dtype=out_dtype)
    kvb_k = torch.zeros(H, Dn, R, dtype=torch.float64)
    if Kn and Dn >= exact_dn:
        if R <= Kn:  # k_nope = the latent itself; B_k absorbed into the queries
            for h in range(H):  # (R, Kn) @ (Kn, D) @ (D, hidden): never the head's (Kn, hidden) rows
                q_out[h, :R] = (Bk.T @ p.Cn[h]) @ p.q[h] * scale
            kvb_k[:, :R] = torch.eye(R, dtype=torch.float64)
        else:
            for h in range(H):
                q_out[h, :Kn] = p.Cn[h] @ p.q[h] * scale
            kvb_k[:, :Kn] = Bk
    elif Kn and Dn > 0:  # truncated per-head factorisation of B_k^T Q_h, weighted by the inputs
        Sx_half, _ = psd_sqrt(p.Sx)
        for h in range(H):
            M = (Bk.T @ p.Cn[h]) @ p.q[h]  # (R, hidden)
            U_, _, _ = torch.linalg.svd(M @ Sx_half, full_matrices=False)
            Ud = U_[:, :Dn]
            kvb_k[h] = Ud.T
            q_out[h, :Dn] = Ud.T @ M * scale
    return q_out, kvb_k


def _rope_part(p: JointLatentPlan, interleave: bool):
    """q_rope, k_pe and k_pe's bias, permuted to interleaved pair order if asked."""
    q_rope, k_pe, k_pe_bias = p.q_rope, p.k_pe, p.k_pe_bias
    if interleave:
        q_rope = rotate_half_to_interleaved(q_rope, dim=1)
        k_pe = rotate_half_to_interleaved(k_pe, dim=0)
        k_pe_bias = None if k_pe_bias is None else rotate_half_to_interleaved(k_pe_bias, dim=0)
    return q_rope, k_pe, k_pe_bias


def _mla_biases(attn: AttentionWeights, k_pe_bias: torch.Tensor | None, R: int, Dr: int):
    """kv_a and o_proj biases: the rope key bias; the value bias folded into o_proj (exact). Both
    or neither, since DeepseekV3 has one flag."""
    hidden = attn.hidden_size
    kv_a_bias = None if k_pe_bias is None else torch.cat([torch.zeros(R, dtype=torch.float64), k_pe_bias])
    o_bias = None if attn.o_bias is None else attn.o_bias.double().clone()
    if attn.v_bias is not None:
        fold = torch.einsum("xhd,hd->x", attn.o.double(), attn.v_bias.double()[attn.kv_index()])
        o_bias = fold if o_bias is None else o_bias + fold
    if kv_a_bias is not None and o_bias is None:
        o_bias = torch.zeros(hidden, dtype=torch.float64)
    if o_bias is not None and kv_a_bias is None:
        kv_a_bias = torch.zeros(R + Dr, dtype=torch.float64)
    return kv_a_bias, o_bias


def convert_layer_to_mla(
    attn: AttentionWeights,
    x: torch.Tensor | None,
    kv_lora_rank: int,
    rope_dim: int,
    method: str = "calibrated",
    fit: MlaFit = MlaFit(),
    *,
    token_weights: torch.Tensor | None = None,
    head_weights: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> MlaWeights:
    """One layer -> DeepSeek MLA with latent rank ``kv_lora_rank`` (R) and shared rope dim ``rope_dim`` (Dr).

    x: (N, hidden) or (B, T, hidden) calibration attention inputs (the post-input-norm hidden
    states). ``method="svd"`` needs none (weight-only basis); if given, x is then only used for the
    latent-norm scales and the kv_b refit (``MlaFit(norm_fit=False, refit=False)`` for a pure baseline).
    fit: the fit's options (``MlaFit``). token_weights: (N,) importance of each calibration token
    for the joint PCA and the kv_b refit, e.g. ``attention_token_weights``. head_weights: (H,) importance of
    each query head in the calibrated RoRoPE and whitening (``RetrievalWeighting``; None: every head alike).
    Measurements land in ``MlaWeights.info`` (``rope_theta`` is what the config must use).
    """
    H, D, hidden = attn.q.shape
    G, Dv = attn.num_kv_heads, attn.v_head_dim
    R, Dr = kv_lora_rank, rope_dim
    check_mla_ranks(num_kv_heads=G, head_dim=D, v_head_dim=Dv, rope=attn.rope, kv_lora_rank=R, rope_dim=rope_dim,
                    hidden_size=hidden, frequencies=fit.frequencies)
    r = _latent_dims(R, fit.effective_rank, fit.norm_ballast)
    p = joint_latent_plan(attn, x, rope_dim, method, fit, token_weights, head_weights)
    X = _flat(x)
    u = None if token_weights is None or X is None else token_weights.reshape(-1).double()
    info = dict(p.info)
    Kn = p.Wk.shape[0]
    W = torch.cat([p.Wk, p.Wv])  # R <= |W| (check_mla_ranks)

    A0, B0 = _latent_basis(p, W, r, R)
    total = float(p.evals.sum())
    info["energy_kept"] = float(p.evals[:r].sum()) / total if total > 0 else 1.0
    info["effective_rank"] = r
    norm = _fit_latent_norm(X, A0, r, fit.norm_ballast, fit.norm_fit, info)
    B = B0.clone()
    if X is not None and fit.refit:
        B = _refit_kv_b(X, W, norm, u)
        norm.w[r:norm.used] = (norm.r0 / norm.s)[r:norm.used]
    if X is not None:
        info.update(_kv_errors(X, norm, W, B, Kn))
    Bk, Bv = B[:Kn], B[Kn:]

    # assembly: q = [q_nope | q_rope] * scale, kv_b = [k_nope_b | v_b]
    Dn = min(R, Kn) if fit.qk_nope_head_dim is None else int(fit.qk_nope_head_dim)
    if Dn < 0:
        raise MlaConversionError(f"qk_nope_head_dim must be >= 0, got {Dn}")
    out_dtype = dtype or attn.q.dtype
    scale = math.sqrt((Dn + Dr) / D)
    q_out, kvb_k = _nope_queries(p, Bk, R, Dn, Dn + Dr, scale, out_dtype)
    kvb_v = Bv.reshape(G, Dv, R)[attn.kv_index()]
    kv_b = torch.cat([kvb_k, kvb_v], dim=1)
    q_rope, k_pe, k_pe_bias = _rope_part(p, fit.rope_interleave)
    q_out[:, Dn:] = q_rope * scale
    kv_a = torch.cat([norm.A, k_pe])
    kv_a_bias, o_bias = _mla_biases(attn, k_pe_bias, R, Dr)
    info.update(qk_nope_head_dim=Dn, v_head_dim=Dv, kv_lora_rank=R, qk_rope_head_dim=Dr, method=method,
                rope_interleave=fit.rope_interleave)
    out = MlaWeights(q=q_out, kv_a=kv_a, kv_a_norm=norm.w, kv_b=kv_b, o=attn.o.to(out_dtype, copy=True),
                     kv_a_bias=kv_a_bias, o_bias=o_bias, rope_interleaved=fit.rope_interleave, info=info)
    return out.to(out_dtype)


def _cv(v: torch.Tensor) -> float:
    return float(v.std() / v.mean().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# plain-PyTorch references (one layer, causal, no cache): measure a conversion before building a model


def attention_token_weights(attn: AttentionWeights, x: torch.Tensor, power: float = 1.0, mix: float = 1.0,
                            head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B*T,) weights, mean 1: ``(1 - mix) + mix * received``, where ``received`` is how much attention
    each calibration token gets in the source layer (sum over heads and later queries of
    ``p**power``, normalised to mean 1). Attention sinks get weights in the hundreds.
    ``head_weights`` (H,): head h's attention counts that many times in the sum (None: once each)."""
    x = x.double()
    if x.dim() != 3:
        raise MlaConversionError("attention_token_weights needs x shaped (batch, seq, hidden)")
    inv, scale = resolve_rope(attn)
    rec = torch.cat([received_attention(attn, xb, power, inv_freq=inv, attention_scaling=scale, head_weights=head_weights)
                     for xb in x])
    rec = rec / rec.mean()
    return (1 - mix) + mix * rec


def refit_output(
    w: MlaWeights, attn: AttentionWeights, x: torch.Tensor, ridge: float = 1e-2, target: torch.Tensor | None = None
) -> MlaWeights:
    """Least-squares refit of ``o_proj`` so the converted layer's output matches the source's on
    calibration sequences x (B, T, hidden): ``min sum_t ||y_t - O a_t||^2 + lam ||O - O_0||^2`` with
    ``a_t`` the converted per-head attention outputs (kv_a_layernorm included) and ``lam = ridge x``
    the mean diagonal of ``A^T A``. Compensates on average for what the latent and the lost RoPE
    changed in the attention mixtures; the cache is unchanged. ``target`` (B, T, hidden): outputs to
    match instead of the source layer's on x (e.g. sequential calibration correcting upstream drift)."""
    if x.dim() != 3:
        raise MlaConversionError("refit_output needs x shaped (batch, seq, hidden)")
    a = mla_head_outputs(w, x)  # (B, H, T, Dv)
    B_, H, T, Dv = a.shape
    a = a.permute(0, 2, 1, 3).reshape(B_ * T, H * Dv)
    y = (attention_output(attn, x) if target is None else target.double()).reshape(B_ * T, -1)
    if w.o_bias is not None:
        y = y - w.o_bias.double()
    O0 = w.o.double().reshape(w.hidden_size, H * Dv)
    O = ridge_towards(a, y, O0, ridge)
    before, after = relative_mse(a @ O0.T, y), relative_mse(a @ O.T, y)
    info = dict(w.info, o_refit_rel_err_before=before, o_refit_rel_err_after=after)
    return MlaWeights(q=w.q, kv_a=w.kv_a, kv_a_norm=w.kv_a_norm, kv_b=w.kv_b, o=O.reshape_as(w.o).to(w.o.dtype),
                      kv_a_bias=w.kv_a_bias, o_bias=w.o_bias, rope_interleaved=w.rope_interleaved, info=info)


def _query_rows(w: MlaWeights, h: int) -> torch.Tensor:
    """Head h's query rows (Dq, hidden) float64, the rope part in rotate-half order."""
    m = w.q[h].double()
    Dn = w.qk_nope_head_dim
    return torch.cat([m[:Dn], interleaved_to_rotate_half(m[Dn:], 0)]) if w.rope_interleaved else m


def _converted_keys(w: MlaWeights, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The converted layer's keys on one sequence xb (T, hidden): nope keys (H, T, Dn) through
    kv_a_layernorm and kv_b, and the shared rope key (T, Dr) in rotate-half order, unrotated; float64."""
    R, Dn = w.kv_lora_rank, w.qk_nope_head_dim
    ckv = xb @ w.kv_a.double().T
    if w.kv_a_bias is not None:
        ckv = ckv + w.kv_a_bias.double()
    c = w.kv_a_norm.double() * ckv[:, :R] / latent_rms(ckv[:, :R])[:, None]
    k_nope = torch.einsum("hdr,tr->htd", w.kv_b.double()[:, :Dn], c)
    k_pe = ckv[:, R:]
    if w.rope_interleaved:
        k_pe = interleaved_to_rotate_half(k_pe, -1)
    return k_nope, k_pe


def _causal_rows(T: int, ts: torch.Tensor) -> torch.Tensor:
    """(t, T) bool: which of T keys each sampled query position ts sees (the rows ts of a causal mask)."""
    return torch.arange(T) <= ts[:, None]


def _source_scores(attn: AttentionWeights, xb: torch.Tensor, ts: torch.Tensor, rope: tuple, uniform: float):
    """The source's scores S (H, t, T) of the sampled queries ts (zero past each query) and the
    per-key weights ``(1 - uniform) p + uniform / (t + 1)`` of the refit."""
    causal = _causal_rows(xb.shape[0], ts)
    q, k = source_qk(attn, xb, *rope)
    S = (q[:, ts] @ k[attn.kv_index()].transpose(-1, -2)) * attn.head_dim ** -0.5  # (H, t, T): sampled rows only
    P = S.masked_fill(~causal, float("-inf")).softmax(-1)
    S = S.masked_fill(~causal, 0.0)
    Om = (1 - uniform) * P + uniform * causal.double() / (ts[:, None] + 1).double()
    return S, Om


def _absolute_keys(k_nope: torch.Tensor, k_pe: torch.Tensor, rope: tuple) -> torch.Tensor:
    """(H, T, Dq) float64: each head's full key times the softmax scale Dq^-0.5, the shared rope key
    rotated to its own position s (scaled as the engine scales cos and sin: yarn's factor reaches the
    score through query and key)."""
    inv_new, rope_scale = rope
    T, Dr = k_pe.shape
    cos, sin = rope_cos_sin(inv_new, T, rope_scale ** 2)
    k_abs = apply_rope(k_pe, cos, sin, Dr)
    K = torch.cat([k_nope.double(), k_abs[None].expand(k_nope.shape[0], -1, -1)], -1)
    return K * K.shape[-1] ** -0.5


def _rotate_rope_part(q: torch.Tensor, ts: torch.Tensor, inv_freq: torch.Tensor, Dn: int, sign: float) -> torch.Tensor:
    """q (..., t, Dq) with its rope dims (rotate-half) turned by ``sign * ts`` positions, unscaled."""
    cos, sin = rope_cos_sin(inv_freq, sign * ts.double())
    return torch.cat([q[..., :Dn], apply_rope(q[..., Dn:], cos, sin, q.shape[-1] - Dn)], -1)


def _prefix_grams(K: torch.Tensor, stride: int, nt: int) -> torch.Tensor:
    """(nt, d, d): sum of k k^T over keys 0..j*stride, for j < nt."""
    T, d = K.shape
    Kp = torch.cat([K.new_zeros(stride - 1, d), K, K.new_zeros(nt * stride - T, d)])[: nt * stride]
    seg = Kp.reshape(nt, stride, d)  # segment j: keys (j-1)*stride+1 .. j*stride
    C = torch.bmm(seg.transpose(1, 2), seg)
    for j in range(1, nt):  # in place: torch's cumsum over dim 0 ran ~2.5x slower here
        C[j] += C[j - 1]
    return C


def _sparse_weights(Om: torch.Tensor, ts: torch.Tensor, keys: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Om (t, T) as ``base_t`` on every causal key plus a non-negative excess on at most ``keys`` keys
    per row: returns base (t,), the excess's key indices (t, k) and values (t, k). Keeping the
    ``keys`` heaviest keys exactly and spreading the rest's weight evenly over them keeps each row's
    mass; with ``keys`` None (or >= the row's causal length) the rows are exact."""
    nt, T = Om.shape
    k = T if keys is None else min(keys, T)
    val, idx = Om.topk(k, dim=-1)
    n_causal = ts + 1
    dropped = (Om.sum(-1) - val.sum(-1)).clamp_min(0)
    base = torch.where(n_causal > k, dropped / (n_causal - k).clamp_min(1), torch.zeros_like(dropped))
    # base <= every kept causal weight (kept are the heaviest); non-causal picks (rows shorter than k)
    # have weight 0 and base 0 there, so their excess is 0.
    return base, idx, (val - base[:, None]).clamp_min(0)


def _target_queries(K: torch.Tensor, S: torch.Tensor, Om: torch.Tensor, q0: torch.Tensor, ts: torch.Tensor,
                    stride: int, ridge: float, keys: int | None, chunk: int = 32) -> torch.Tensor:
    """(H, t, Dq) per head and sampled position t: ``argmin_q sum_s om_ts (k~_ts q - s~_ts)^2 + lam |q - q0|^2``,
    keys and source scores row-centred under om (softmax ignores a per-row constant), lam = ridge x
    mean diag of the weighted gram.

    Solved in the absolute RoPE frame: the converted key seen from t is R(-t) K_s, so q = R(-t) q'
    with q' solving the same problem against the absolute keys K (H, T, Dq) and towards R(t) q0 (ts
    and q0 rotated by the caller). Rows with fewer causal keys than Dq are solved in key space,
    ``q0 + A^T (A A^T + lam I)^-1 (s~ - A q0)`` with A = sqrt(om) K~ (Woodbury, same minimiser: an 8B
    layer's Dq = 576 against 64..256 keys). The other rows solve the Dq x Dq normal equations, whose
    weighted gram splits into ``base_t`` times a prefix sum of k k^T (shared by every t) plus the
    excess on the ``keys`` heaviest keys (``_sparse_weights``), so its cost grows with T, not T x t."""
    H, T, d = K.shape
    causal = _causal_rows(T, ts)
    out = torch.zeros(H, len(ts), d, dtype=torch.float64)
    for h in range(H):
        # Each row's gram is centred on that row's weighted mean mu: the excess part on the gathered
        # keys directly (float32 products of small numbers), the base part from the shared prefix
        # sums, sum (k - mu)(k - mu)^T = C - mu a^T - a mu^T + n mu mu^T in float64. Shifting every key
        # by the mean first changes nothing and keeps C's float32 sums small.
        Kh = K[h] - K[h].mean(0)
        Kf = Kh.float()
        base, idx, exc = _sparse_weights(Om[h], ts, keys)
        om = (base[:, None] * causal).scatter_add(1, idx, exc)  # the weights actually fitted (t, T)
        W = om.sum(-1)
        mu = (om @ Kh) / W[:, None]
        omS = om * S[h]
        r, ssum = omS @ Kh, omS.sum(-1)
        if bool((base > 0).any()):
            C, a, n = _prefix_grams(Kf, stride, len(ts)), causal.double() @ Kh, (ts + 1).double()
        nfew = int((ts + 1 < d).sum())  # rows with fewer keys than query dims, solved in key space: a prefix
        for c in (torch.arange(i, min(i + 8, nfew)) for i in range(0, nfew, 8)):
            tk = int(ts[c[-1]]) + 1  # the chunk's causal range; later keys carry zero weight
            sq = om[c, :tk].sqrt()
            A = (Kh[:tk] - mu[c, None]) * sq[..., None]  # (c, tk, d)
            lam = (ridge * A.pow(2).sum((1, 2)) / d).clamp_min(1e-12)  # = ridge x mean diag(A^T A)
            G = torch.bmm(A, A.mT)
            G.diagonal(dim1=1, dim2=2).add_(lam[:, None])
            sc = (S[h, c, :tk] - ssum[c, None] / W[c, None]) * sq
            y = spd_solve(G, sc - torch.bmm(A, q0[h, c, :, None])[..., 0])
            out[h, c] = q0[h, c] + torch.bmm(A.mT, y[..., None])[..., 0]
        for c in (torch.arange(i, min(i + chunk, len(ts))) for i in range(nfew, len(ts), chunk)):  # none may be left
            kc = min(idx.shape[1], int(ts[c[-1]]) + 1)  # past the chunk's causal range the excess is zero
            Kg = (Kf[idx[c, :kc]] - mu[c, None].float()) * exc[c, :kc, None].sqrt().float()  # (c, kc, d)
            N = torch.bmm(Kg.transpose(1, 2), Kg).double()
            if bool((base[c] > 0).any()):
                mc, ac = mu[c, :, None], a[c, :, None]  # (c, d, 1)
                U = C[c].double() - mc * ac.mT - ac * mc.mT + n[c, None, None] * mc * mc.mT
                N = N + base[c, None, None] * U
            lam = ridge * N.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
            N.diagonal(dim1=1, dim2=2).add_(lam[:, None])
            out[h, c] = spd_solve(N, r[c] - mu[c] * ssum[c, None] + lam[:, None] * q0[h, c])
    return out


def _regress_query_rows(w: MlaWeights, Xs: torch.Tensor, qs: torch.Tensor, reg: float) -> torch.Tensor:
    """q_proj (H, Dq, hidden) in w's dtype: per head, ridge regression (reg) of the target queries
    qs (H, N, Dq) on the inputs Xs (N, hidden) towards the current rows, one head at a time."""
    Dn = w.qk_nope_head_dim
    q_new = torch.empty_like(w.q)
    for h in range(w.num_heads):
        Mh = ridge_towards(Xs, qs[h], _query_rows(w, h), reg)  # (Dq, hidden)
        if w.rope_interleaved:
            Mh[Dn:] = rotate_half_to_interleaved(Mh[Dn:], 0)
        q_new[h] = Mh
    return q_new


def refit_queries(
    w: MlaWeights,
    attn: AttentionWeights,
    x: torch.Tensor,
    *,
    ridge: float,
    stride: int,
    keys: int | None,
    reg: float = 1e-2,
    uniform: float = 0.1,
) -> MlaWeights:
    """Least-squares refit of ``q_proj`` against the converted keys (calibration only, closed form).

    For every ``stride``-th query position t of the calibration sequences x (B, T, hidden) and every
    head, the query q*(t) that best reproduces the source's scores against the converted keys
    (nope keys through kv_a_layernorm and kv_b, the shared rope key rotated by the relative
    position), weighted per key by the source attention ``(1 - uniform) p_ts + uniform / (t + 1)``
    and row-centred (softmax ignores a per-row constant), with a ridge ``ridge`` towards the current
    query; then ``q_proj`` rows = ridge regression (``reg``) of q* on the inputs. The cache is unchanged.

    ``keys`` bounds the cost at long windows: per query, the heaviest ``keys`` keys keep their weight
    and the rest share theirs evenly (``_sparse_weights``); None fits every weight exactly.
    ``ridge``, ``stride`` and ``keys`` have no defaults here: ``MlaTuning`` declares them.
    """
    if x.dim() != 3:
        raise MlaConversionError("refit_queries needs x shaped (batch, seq, hidden)")
    x = x.double()
    Bn, T, hidden = x.shape
    H, Dq = w.num_heads, w.qk_nope_head_dim + w.qk_rope_head_dim
    new_rope = rope_tables(mla_rope(w))  # the written config's rope, scaled types included
    src_rope = resolve_rope(attn)
    ts = torch.arange(0, T, stride)
    qstar = torch.zeros(H, Bn, len(ts), Dq, dtype=torch.float64)
    for b in range(Bn):
        xb = x[b]
        S, Om = _source_scores(attn, xb, ts, src_rope, uniform)
        K = _absolute_keys(*_converted_keys(w, xb), new_rope)
        q0 = torch.stack([xb[ts] @ _query_rows(w, h).T for h in range(H)])  # (H, t, Dq) current queries
        q0 = _rotate_rope_part(q0, ts, new_rope[0], w.qk_nope_head_dim, 1.0)  # into the absolute frame
        qs = _target_queries(K, S, Om, q0, ts, stride, ridge, keys)
        qstar[:, b] = _rotate_rope_part(qs, ts, new_rope[0], w.qk_nope_head_dim, -1.0)
    q_new = _regress_query_rows(w, x[:, ts].reshape(-1, hidden), qstar.reshape(H, -1, Dq), reg)
    info = dict(w.info, q_refit=True)
    return MlaWeights(q=q_new, kv_a=w.kv_a, kv_a_norm=w.kv_a_norm, kv_b=w.kv_b, o=w.o, kv_a_bias=w.kv_a_bias,
                      o_bias=w.o_bias, rope_interleaved=w.rope_interleaved, info=info)


# ---------------------------------------------------------------------------------------------
# per-head q/k RMSNorm (Qwen3): fitted away before the conversion


def _normed_fit(Wh: torch.Tensor, bias: torch.Tensor | None, norm_w: torch.Tensor, attn: AttentionWeights,
                X: torch.Tensor, u: torch.Tensor | None, ridge: float) -> tuple[torch.Tensor, float, float]:
    """Per head, the linear rows M (heads, D, hidden) minimising sum_t u_t |n(W x_t + b) - M x_t|^2, n
    the head's RMSNorm; the ridge pulls towards W * w / mean rms (exact where the rms is constant).
    Returns M, the relative squared error and the coefficient of variation of the pre-norm rms."""
    Z = torch.einsum("ni,hdi->hnd", X, Wh.double())
    if bias is not None:
        Z = Z + bias.double()[:, None]
    target = rms_norm(Z, norm_w, attn.norm_eps, attn.norm_offset)
    rms = (Z.pow(2).mean(-1) + attn.norm_eps).sqrt()  # (heads, N)
    su = None if u is None else u.sqrt()[:, None]
    Xw = X if su is None else X * su
    M = torch.empty_like(Wh, dtype=torch.float64)
    for h in range(Wh.shape[0]):
        W0 = Wh[h].double() * (attn.norm_offset + norm_w.double())[:, None] / rms[h].mean()
        M[h] = ridge_towards(Xw, target[h] if su is None else target[h] * su, W0, ridge)
    fit = torch.einsum("ni,hdi->hnd", X, M)
    if u is not None:  # the error in the fit's own token weighting
        fit, target = fit * u.sqrt()[None, :, None], target * u.sqrt()[None, :, None]
    return M, relative_mse(fit, target), float((rms.std(1) / rms.mean(1)).mean())


def linearize_qk_norm(attn: AttentionWeights, x: torch.Tensor, token_weights: torch.Tensor | None = None,
                      ridge: float = 1e-6) -> tuple[AttentionWeights, dict]:
    """The layer with its per-head q/k RMSNorm replaced by linear q/k rows fitted on calibration inputs
    x ((N, hidden) or (B, T, hidden)): ``k_g(x) = RMSNorm(W_k,g x) * w_k`` is a nonlinear function of x
    (the norm removes each token's scale), so ``K'_g = argmin sum_t u_t |k_g(x_t) - K' x_t|^2`` (ridge
    towards ``W_k,g * w_k / mean rms``), the same, unweighted, for each query head; ``token_weights``
    u (N,) weight the keys (e.g. by the attention they receive). Biases go into the
    fitted targets and are dropped. Exact when every head's pre-norm rms is constant over the inputs.
    Returns the un-normed layer and the fit's relative squared errors (``info``)."""
    if attn.qk_norm_scope != "head":
        raise MlaConversionError("only per-head q/k norms (Qwen3) can be fitted away; OLMo-2's span the whole projection")
    X = _flat(x)
    u = None if token_weights is None else token_weights.reshape(-1).double()
    info = {}
    q, k = attn.q.double(), attn.k.double()
    if attn.q_norm is not None:
        q, info["q_norm_fit_rel_err"], info["q_rms_cv"] = _normed_fit(attn.q, attn.q_bias, attn.q_norm, attn, X, None, ridge)
    if attn.k_norm is not None:
        k, info["k_norm_fit_rel_err"], info["k_rms_cv"] = _normed_fit(attn.k, attn.k_bias, attn.k_norm, attn, X, u, ridge)
    lin = attn.with_(q=q.to(attn.q.dtype), k=k.to(attn.k.dtype), q_norm=None, k_norm=None,
                     q_bias=None if attn.q_norm is not None else attn.q_bias,
                     k_bias=None if attn.k_norm is not None else attn.k_bias)
    return lin, info
