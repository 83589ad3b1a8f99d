"""Attention -> linear attention (Mamba2, Gated DeltaNet): initialisation from the attention layer it
replaces, the choice of which layers to linearise, and attention transfer.

Pure functions on tensors and ``torch.nn.Module`` layers; no file I/O (``to_hybrid`` drives them).

Mamba2 initialisation (MambaInLlama-style, then calibrated). The layout (``hybrid_layout``) has one
Mamba head and one B/C group per query head, ``d_state = d_head = head_dim``, so every attention
projection has a place:

* V -> x, K -> B, Q -> C (KV heads repeated for the query heads that read them), O -> out_proj.
  x, B and C pass through ``silu`` after the conv; the feature map is chosen per head on
  calibration data: pre-activations ``a * q`` with ``a`` either tiny (``silu(u) ~ u / 2``, plain
  ``q.k`` scores) or around the softmax temperature (``silu`` as a positive feature map), and the
  values always in the near-linear regime (``silu(a v) ~ a v / 2``; the scale cancels in the norm).
* conv1d: identity (weight 1 at the last tap), so the conv passes the current token through.
* dt: input-independent (dt rows 0), ``dt = softplus(dt_bias) = ln 2``; ``A_log`` sets the per-head
  decay ``lambda = exp(-dt exp(A_log))`` chosen per head from a grid on calibration data, so each head
  averages over the recent tokens its attention looks at.
* D (skip) = 0.
* Gate: the Mamba2 output is ``norm_w * groupRMSNorm(y * silu(z))`` with one group per head. z rows
  are 0 and the in_proj bias of z is a constant ``g`` so ``silu(z) = silu(g)`` everywhere: a constant
  factor inside an RMSNorm cancels (up to eps), so the gate is exactly neutral; ``g`` is picked so
  ``eps`` stays negligible (measured: ``info["gate_eps_share"]``).
* The per-head RMSNorm plays the role of the softmax denominator (it removes the scale of the
  unnormalised sum); ``norm_w`` and ``out_proj`` are least-squares fits (ridge towards ``O``) of the
  attention output on the calibration tokens.

Attention transfer (LoLCATs / RADLADS stage 1): ``attention_transfer`` trains one linear layer to
reproduce its attention layer's output (MSE) on the calibration inputs, layer by layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from kvsurgeon.attention.hybrid_layout import GdnDims, GdnWeights, Mamba2Dims, Mamba2Weights
from kvsurgeon.attention.neutral import AttentionWeights

from ..errors import KvSurgeonError
from ..linalg import relative_mse, ridge_solve, ridge_towards, whitened_pca
from kvsurgeon.attention.reference import attention_output, head_outputs

F64 = torch.float64

__all__ = [
    "Mamba2Init",
    "GdnInit",
    "mamba2_from_attention",
    "gdn_from_attention",
    "mamba2_module",
    "gdn_module",
    "linear_layer_output",
    "attention_transfer",
    "TransferResult",
    "resolve_layer_choice",
    "even_linear_layers",
    "relative_mse",
]


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _fit_windows(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first windows of x (B, T, hidden) holding about ``tokens`` tokens (at least one window)."""
    x = _batch(x)
    n = max(1, min(x.shape[0], tokens // max(1, x.shape[1])))
    return x[:n]


# ----------------------------------------------------------------------------------------------
# Layer choice
# ----------------------------------------------------------------------------------------------


def even_linear_layers(num_layers: int, keep: int) -> list[int]:
    """Linear layers when ``keep`` attention layers are spread evenly: attention at
    ``floor((j + 1/2) L / keep)`` for j < keep (centred in equal blocks), linear everywhere else."""
    if keep <= 0:
        return list(range(num_layers))
    attn = {int(math.floor((j + 0.5) * num_layers / keep)) for j in range(keep)}
    return [i for i in range(num_layers) if i not in attn]


def _keep_count(keep_attention: float | int, num_layers: int, flag: str = "--keep-attention") -> int:
    if isinstance(keep_attention, bool) or not isinstance(keep_attention, (int, float)):
        raise KvSurgeonError(f"{flag} must be a number, got {keep_attention!r}")
    k = keep_attention
    if isinstance(k, float) and not math.isfinite(k):
        raise KvSurgeonError(f"{flag} must be finite, got {k}")
    if k < 0:
        raise KvSurgeonError(f"{flag} must be >= 0 (a layer count, or a fraction in [0, 1)); got {k}")
    if isinstance(k, float) and k < 1:
        return int(math.floor(k * num_layers + 0.5))  # a fraction of the layers
    if isinstance(k, float) and not k.is_integer():
        raise KvSurgeonError(
            f"{flag} {k}: a fraction must lie in [0, 1) and a layer count must be a whole number "
            f"(this model has {num_layers} layers)"
        )
    k = int(k)
    if k > num_layers:
        raise KvSurgeonError(f"{flag} {k} is more than the model's {num_layers} layers")
    return k


def resolve_layer_choice(
    num_layers: int,
    keep_attention: float | int | None,
    linear_layers: Sequence[int] | str | None,
) -> tuple[str, int | None, list[int] | None]:
    """Validate the user's choice. Returns (mode, keep, layers):

    * explicit list -> ("list", None, sorted layers)
    * "auto"        -> ("auto", attention layers to keep, None)  (keep defaults to half)
    * "search"      -> ("search", attention layers to keep, None)  (likewise)
    * "even" / None with keep_attention -> ("even", None, evenly interleaved linear layers)

    ``keep_attention``: an int is a count of attention layers kept; a float below 1 is a fraction of
    the layers (rounded to the nearest count); a whole float >= 1 is a count.
    """
    if isinstance(linear_layers, str):
        mode = linear_layers.strip().lower()
        if mode not in ("auto", "even", "search"):
            try:
                linear_layers = [int(s) for s in mode.replace(" ", "").split(",") if s != ""]
            except ValueError:
                raise KvSurgeonError(
                    f"--linear-layers {linear_layers!r}: give a comma-separated list of layer indices, 'auto', 'search' or 'even'"
                ) from None
            mode = "list"
    elif linear_layers is None:
        mode = "even"
        if keep_attention is None:
            raise KvSurgeonError(
                "--to hybrid needs --keep-attention K|FRACTION (attention layers kept, evenly interleaved) or "
                "--linear-layers LIST|auto"
            )
    else:
        mode = "list"
    if mode == "list":
        layers = list(linear_layers)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise KvSurgeonError(f"--linear-layers must be integers, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise KvSurgeonError(f"--linear-layers {bad} out of range: this model has layers 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise KvSurgeonError(f"--linear-layers lists a layer twice: {layers}")
        if keep_attention is not None and _keep_count(keep_attention, num_layers) != num_layers - len(layers):
            raise KvSurgeonError(
                f"--keep-attention {keep_attention} contradicts --linear-layers ({len(layers)} of {num_layers} layers "
                f"linear keeps {num_layers - len(layers)}); give one of them"
            )
        return "list", None, sorted(layers)
    keep = _keep_count(0.5 if keep_attention is None else keep_attention, num_layers)
    if mode in ("auto", "search"):
        return mode, keep, None
    return "even", None, even_linear_layers(num_layers, keep)


# ----------------------------------------------------------------------------------------------
# Projections of the source attention
# ----------------------------------------------------------------------------------------------


def _projections(attn: AttentionWeights, x: torch.Tensor, dtype=F64):
    """q (B, T, H, D), k and v repeated to H heads, before RoPE (and before q/k norms)."""
    x = _batch(x).to(dtype)
    q = torch.einsum("bti,hdi->bthd", x, attn.q.to(dtype))
    k = torch.einsum("bti,gdi->btgd", x, attn.k.to(dtype))
    v = torch.einsum("bti,gdi->btgd", x, attn.v.to(dtype))
    if attn.q_bias is not None:
        q = q + attn.q_bias.to(dtype)
    if attn.k_bias is not None:
        k = k + attn.k_bias.to(dtype)
    if attn.v_bias is not None:
        v = v + attn.v_bias.to(dtype)
    kv = attn.kv_index()
    return q, k[:, :, kv], v[:, :, kv]


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Per-head RMS over (batch, time, dim): (H,)."""
    return t.to(F64).pow(2).mean(dim=(0, 1, 3)).sqrt().clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# Mamba2
# ----------------------------------------------------------------------------------------------

DT0_BIAS = 0.0  # dt = softplus(0) = ln 2 at init


@dataclass
class Mamba2Init:
    """Knobs of the calibrated Mamba2 initialisation."""

    decays: tuple[float, ...] = (0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
    # q/k feature maps silu(a q + b): (a in units of the softmax temperature D^-1/4, shift b)
    feature_maps: tuple[tuple[float, float], ...] = (
        (0.05, 0.0), (0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (4.0, 0.0), (1.0, 1.0), (2.0, 1.0), (4.0, 1.0), (1.0, 2.0), (2.0, 2.0),
    )
    denominator: bool = True  # one value channel per head carries a constant: the norm then divides by sum of weights
    denominator_preact: float = 6.0  # pre-activation of that channel: silu(6) = 5.985
    v_rms: float = 0.05  # RMS of the value pre-activations: silu(u) ~ u/2 (1 + u/2) stays near-linear
    fit_tokens: int = 2048  # calibration tokens for the per-head grid
    refit_tokens: int = 16384  # calibration tokens for the norm / out_proj least squares
    refit_out: bool = True
    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # out_proj refit: ridge * mean diag(F^T F) towards O, picked on held-out windows
    eps_margin: float = 1e4  # gate chosen so the mean of (y silu(g))^2 is >= eps_margin * eps


def _decay_mask(T: int, decays: torch.Tensor, dtype) -> torch.Tensor:
    """(H, T, T) lambda_h^(t-s) for s <= t, 0 above the diagonal."""
    d = torch.arange(T, dtype=F64)
    diff = d[:, None] - d[None, :]
    logl = torch.log(decays.to(F64).clamp_min(1e-30))
    m = torch.exp(diff[None] * logl[:, None, None]).masked_fill(diff[None] < 0, 0.0)
    return m.to(dtype)


def _mamba2_heads(Cf, Bf, Xf, decays, dt0):
    """Quadratic (parallel) form of a Mamba2 head with constant dt: (B, T, H, ·) each ->
    y_t = sum_{s<=t} lambda^(t-s) dt (C_t . B_s) x_s."""
    T = Cf.shape[1]
    S = torch.einsum("bthn,bshn->bhts", Cf, Bf) * _decay_mask(T, decays, Cf.dtype) * dt0
    return torch.einsum("bhts,bshd->bthd", S, Xf)


def _group_norm(y: torch.Tensor, c: float, eps: float) -> torch.Tensor:
    y = y * c
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def _quad(a: torch.Tensor, OtO: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_n a_nh^T OtO_h b_nh per head: a, b (N, H, D), OtO (H, D, D) -> (H,)."""
    return (torch.bmm(a.transpose(0, 1), OtO) * b.transpose(0, 1)).sum(dim=(1, 2))


def _quad_tok(a: torch.Tensor, OtO: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a_nh^T OtO_h b_nh per token and head: (N, H)."""
    return (torch.bmm(a.transpose(0, 1), OtO) * b.transpose(0, 1)).sum(-1).transpose(0, 1)


def _diag_fit(n: torch.Tensor, z: torch.Tensor, ridge: float = 1e-6):
    """Per-head, per-channel weights w (H, C) minimising sum_t ||z - w * n||^2 and the relative
    error per head; n, z: (N, H, C)."""
    num = (n * z).sum(0)
    den = n.pow(2).sum(0)
    w = num / (den + ridge * den.mean(-1, keepdim=True).clamp_min(1e-30))
    e = z - w[None] * n
    return w, e.pow(2).sum(dim=(0, 2)) / z.pow(2).sum(dim=(0, 2)).clamp_min(1e-300)


def _value_basis(v: torch.Tensor, O: torch.Tensor, keep: int):
    """Per head, the ``keep``-dim value subspace that loses least attention output.

    v: (N, H, D) value activations (KV heads repeated), O: (hidden, H, D). Under the metric
    O_h^T O_h the output error is the value error, so this is a whitened PCA per head. Returns P
    (H, keep, D) mapping v to the kept coordinates and Oq (hidden, H, keep) reading them (Oq_h P_h =
    O_h on the kept subspace, exactly O_h when keep = D).
    """
    OtO = torch.einsum("ihd,ihe->hde", O, O)
    P, Q = whitened_pca(torch.einsum("nhd,nhe->hde", v, v), OtO, keep)
    return P, torch.einsum("ihd,hdk->ihk", O, Q)


def mamba2_from_attention(
    attn: AttentionWeights,
    x: torch.Tensor,
    dims: Mamba2Dims,
    *,
    eps: float,
    init: Mamba2Init | None = None,
    target: torch.Tensor | None = None,
) -> tuple[Mamba2Weights, dict]:
    """A Mamba2 layer initialised from ``attn`` and calibrated on its inputs ``x`` (B, T, hidden).

    Per head: values in the near-linear regime of silu, projected onto the D - 1 dims of value space
    that matter most for the output (``_value_basis``), plus, with ``init.denominator``, one constant
    value channel: its output is the running sum of the weights, so the head's RMSNorm divides by it
    (normalised linear attention, a convex combination of values as in softmax attention). Keys and
    queries through ``silu(a q + b)`` with (a, b) and the decay picked per head from a grid on the
    fit tokens; norm weights and out_proj by least squares on the refit tokens.

    ``target`` (B, T, hidden): the attention output on ``x`` if already computed. Returns the weights
    (float32) and measurements.
    """
    init = init or Mamba2Init()
    _check_mamba2_layout(attn, dims)
    H, D, hidden = attn.q.shape
    x = _batch(x)
    dt0 = math.log(2.0)  # softplus(DT0_BIAS)
    keep = D - 1 if init.denominator else D  # one value dim per head gives way to the denominator channel
    K = F.silu(torch.tensor(init.denominator_preact)).item()

    # 1. per-head value basis, feature maps and decays, on the fit tokens
    xf = _fit_windows(x, init.fit_tokens)
    Nf = xf.shape[0] * xf.shape[1]
    q, k, v = _projections(attn, xf, F64)
    P, Oq, a_v = _mamba2_values(attn, v, keep, init)  # values in whitened, ranked coordinates
    Xf = _mamba2_x(P, v, a_v, torch.full((H,), K, dtype=F64)).float()
    zq = torch.einsum("hkd,nhd->nhk", P, head_outputs(attn, xf).reshape(Nf, H, D))  # target, whitened: error = squared error
    best_err, a_qk, shift, decays, den_on = _mamba2_grid(q, k, Xf, zq, keep, dt0, init)

    # 2. per-head outputs on the refit tokens with the chosen maps, the real gate and eps
    xr = _fit_windows(x, init.refit_tokens)
    Nr = xr.shape[0] * xr.shape[1]
    n, gate_bias, gate_eps_share = _mamba2_normed_heads(attn, xr, P, a_v, a_qk, shift, decays, K * den_on, dt0, eps, init)

    # 3. norm weights, then out_proj (and its bias) by least squares
    zr = torch.einsum("hkd,nhd->nhk", P, head_outputs(attn, xr).reshape(Nr, H, D))
    norm_w, Wout, feats = _mamba2_norm_and_readout(n, zr, Oq)
    y_att = attention_output(attn, xr).reshape(Nr, hidden) if target is None else _fit_windows(target, init.refit_tokens).reshape(Nr, hidden).to(F64)
    bias = attn.o_bias.to(F64) if attn.o_bias is not None else torch.zeros(hidden, dtype=F64)
    err_diag = relative_mse(feats @ Wout.T + bias, y_att)
    ridge = None
    if init.refit_out:
        Wout, bias, ridge = _refit_out_with_bias(feats, y_att, Wout, bias, init.ridges, group=xr.shape[1])
    err = relative_mse(feats @ Wout.T + bias, y_att)

    weights = _mamba2_weights(attn, dims, P, a_qk, shift, a_v, decays, den_on, gate_bias, norm_w.reshape(-1), Wout, bias, init)
    info = {
        "decay": [round(float(d), 4) for d in decays],
        "qk_scale": [round(float(s), 3) for s in a_qk],
        "qk_shift": [round(float(s), 2) for s in shift],
        "denominator": [int(d) for d in den_on],
        "head_rel_err_fit": [round(float(e), 4) for e in best_err],
        "gate_bias": round(gate_bias, 3),
        "gate_eps_share": gate_eps_share,
        "rel_mse_init_diag": err_diag,
        "rel_mse_init": err,
        "out_ridge": ridge,
        "fit_tokens": int(Nf),
        "refit_tokens": int(Nr),
    }
    return weights, info


def _check_mamba2_layout(attn: AttentionWeights, dims: Mamba2Dims) -> None:
    H, D, hidden = attn.q.shape
    if (dims.n_heads, dims.head_dim, dims.n_groups, dims.d_state, dims.hidden) != (H, D, H, D, hidden):
        raise KvSurgeonError(
            f"Mamba2 layout {dims} does not match the attention (H={H}, D={D}, hidden={hidden}): need n_heads = "
            f"n_groups = H and d_head = d_state = D"
        )
    if attn.q_norm is not None or attn.k_norm is not None:
        raise KvSurgeonError("Mamba2 init from attention with q/k norms (Qwen3) is not supported; use gated-deltanet")


def _mamba2_values(attn: AttentionWeights, v: torch.Tensor, keep: int, init: Mamba2Init):
    """From the value activations v (B, T, H, D): the per-head value basis P (H, keep, D), its read-out
    Oq (hidden, H, keep) (``_value_basis``) and the per-head value scale a_v (H,) that puts the value
    coordinates at RMS ``init.v_rms``."""
    B, T, H, D = v.shape
    P, Oq = _value_basis(v.reshape(B * T, H, D), attn.o.to(F64), keep)
    a_v = init.v_rms / _rms(torch.einsum("hkd,bthd->bthk", P, v))
    return P, Oq, a_v


def _mamba2_x(P: torch.Tensor, v: torch.Tensor, a_v: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """The x input of the Mamba2 heads (B, T, H, D): silu of the scaled value coordinates and, when P
    keeps fewer than D dims, the denominator channel holding ``den`` (H,) (silu(preact), or 0 on heads
    that do not use it)."""
    X = F.silu(torch.einsum("hkd,bthd->bthk", P, v) * a_v[:, None])
    if P.shape[1] < P.shape[2]:
        X = torch.cat([X, den.expand(*X.shape[:-2], P.shape[0])[..., None]], -1)
    return X


def _mamba2_grid(q: torch.Tensor, k: torch.Tensor, X: torch.Tensor, z: torch.Tensor, keep: int, dt0: float, init: Mamba2Init):
    """Per head, the feature map silu(a q + b) (``init.feature_maps``), decay (``init.decays``) and
    denominator channel (on/off) whose normalised output best predicts z (N, H, keep), the attention
    output in whitened value coordinates, up to per-channel weights (``_diag_fit``).

    q, k (B, T, H, D) float64; X (B, T, H, D) float32 from ``_mamba2_x``. Returns (error per head, a,
    b, decay, denominator on), each (H,)."""
    Bsz, T, H, D = q.shape
    N = Bsz * T
    temp = D**-0.25
    best_err = torch.full((H,), float("inf"), dtype=F64)
    best = torch.zeros(H, 4, dtype=F64)  # (a, b, decay, denominator on)
    qf, kf = q.float(), k.float()
    for a_mult, shift in init.feature_maps:
        Cf, Bm = F.silu(qf * (a_mult * temp) + shift), F.silu(kf * (a_mult * temp) + shift)
        S0 = torch.einsum("bthn,bshn->bhts", Cf, Bm) * dt0
        for lam in init.decays:
            y = torch.einsum("bhts,bshd->bthd", S0 * _decay_mask(T, torch.tensor([lam]), torch.float32), X).to(F64)
            modes = [0.0]
            if init.denominator and shift >= 1:  # the sum of weights must stay positive
                modes.append(1.0)
            for den in modes:
                yy = y if den else torch.cat([y[..., :keep], torch.zeros_like(y[..., keep:])], -1)
                n = _group_norm(yy, 1.0, float(yy.pow(2).mean()) / init.eps_margin)[..., :keep].reshape(N, H, keep)
                _, err = _diag_fit(n, z)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best[better] = torch.tensor([a_mult * temp, shift, lam, den], dtype=F64)
        del S0
    return best_err, best[:, 0], best[:, 1], best[:, 2], best[:, 3]


def _mamba2_normed_heads(attn, xr, P, a_v, a_qk, shift, decays, den, dt0: float, eps: float, init: Mamba2Init):
    """The Mamba2 heads' gated, group-normalised outputs on xr (B, T, hidden) with the chosen per-head
    maps: (N, H, D), the gate bias g and the share of eps in the norm. g is the smallest with
    silu(g)^2 mean(y^2) >= ``init.eps_margin`` eps, so the constant gate stays neutral."""
    H, D, _ = attn.q.shape
    Br = xr.shape[0]
    qr, kr, vr = _projections(attn, xr, F64)
    Cr = F.silu(qr * a_qk[:, None] + shift[:, None]).float()
    Brr = F.silu(kr * a_qk[:, None] + shift[:, None]).float()
    Xr = _mamba2_x(P, vr, a_v, den)
    y = torch.cat([_mamba2_heads(Cr[i : i + 4], Brr[i : i + 4], Xr[i : i + 4].float(), decays, dt0) for i in range(0, Br, 4)]).to(F64)
    ms = float(y.pow(2).mean())
    c = max(1.0, math.sqrt(init.eps_margin * eps / max(ms, 1e-300)))
    gate_bias = _silu_inverse(c)
    n = _group_norm(y, F.silu(torch.tensor(gate_bias, dtype=F64)).item(), eps).reshape(-1, H, D)
    return n, gate_bias, float(eps / (ms * c * c + eps))


def _mamba2_norm_and_readout(n: torch.Tensor, z: torch.Tensor, Oq: torch.Tensor):
    """Norm weights (H, D) fitted per channel so the normalised heads n (N, H, D) match z (N, H, keep),
    the attention output in whitened value coordinates (the denominator channel's weight stays 1);
    out_proj (hidden, H D) reading the kept coordinates through Oq (0 on the denominator channel);
    and the weighted features (N, H D) out_proj reads."""
    N, H, D = n.shape
    hidden, _, keep = Oq.shape
    w, _ = _diag_fit(n[..., :keep], z)
    norm_w = torch.ones(H, D, dtype=F64)
    norm_w[:, :keep] = w
    Wout = torch.zeros(hidden, H, D, dtype=F64)
    Wout[:, :, :keep] = Oq.reshape(hidden, H, keep)
    return norm_w, Wout.reshape(hidden, H * D), (n * norm_w[None]).reshape(N, H * D)


def _refit_out_with_bias(feats, y, Wout, bias, ridges: Sequence[float], group: int):
    """out_proj and its bias refitted together (``_ridge_refit`` on the features plus a constant column),
    towards (Wout, bias). Returns (Wout, bias, ridge)."""
    Fa = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], 1)
    W0 = torch.cat([Wout, bias[:, None]], 1)
    Wa, ridge = _ridge_refit(Fa, y, W0, ridges, group=group)
    return Wa[:, :-1], Wa[:, -1], ridge


def _ridge_refit(Fa: torch.Tensor, Y: torch.Tensor, W0: torch.Tensor, ridges: Sequence[float], group: int):
    """Least squares ``W = argmin ||Fa W^T - Y||^2 + lam ||W - W0||^2`` with ``lam = ridge * mean diag(Fa^T Fa)``;
    the ridge is picked on the last eighth of the rows (whole windows of ``group`` rows) and the fit redone on all."""
    n = Fa.shape[0]
    windows = n // group
    hold = max(1, windows // 8) * group if windows > 1 else 0

    def solve(Fm, Ym, r):
        return ridge_towards(Fm, Ym, W0, r)

    best = ridges[len(ridges) // 2]
    if hold and len(ridges) > 1:
        errs = []
        for r in ridges:
            W = solve(Fa[: n - hold], Y[: n - hold], r)
            errs.append(relative_mse(Fa[n - hold :] @ W.T, Y[n - hold :]))
        best = ridges[int(torch.tensor(errs).argmin())]
    return solve(Fa, Y, best), best


def _silu_inverse(c: float) -> float:
    """The z >= -1.28 solution of silu(z) = c (c > 0), by Newton's method."""
    z = max(c, 1.0)
    for _ in range(50):
        s = 1 / (1 + math.exp(-z))
        f = z * s - c
        z -= f / (s * (1 + z * (1 - s)))
    return z


def _silu_inverse_t(c: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Elementwise ``_silu_inverse`` for a tensor of positive values (float64 Newton iterations)."""
    c = c.to(F64)
    z = c.clamp_min(1.0)
    for _ in range(iters):
        s = torch.sigmoid(z)
        z = z - (z * s - c) / (s * (1 + z * (1 - s)))
    return z


def _mamba2_weights(attn, dims, P, a_qk, shift, a_v, decays, den_on, gate_bias, norm_w, Wout, out_bias, init) -> Mamba2Weights:
    H, D, hidden = attn.q.shape
    keep = P.shape[1]
    I = dims.inner
    kv = attn.kv_index()
    q = attn.q.to(F64) * a_qk[:, None, None]
    k = attn.k.to(F64)[kv] * a_qk[:, None, None]
    xrows = torch.zeros(H, D, hidden, dtype=F64)
    xrows[:, :keep] = torch.einsum("hkd,hdi->hki", P, attn.v.to(F64)[kv]) * a_v[:, None, None]
    xbias = torch.zeros(H, D, dtype=F64)
    if attn.v_bias is not None:
        xbias[:, :keep] = torch.einsum("hkd,hd->hk", P, attn.v_bias.to(F64)[kv]) * a_v[:, None]
    if keep < D:  # the denominator channel: a constant silu(preact) on heads that use it, else 0
        xbias[:, keep:] = init.denominator_preact * den_on[:, None]
    qb = attn.q_bias.to(F64) * a_qk[:, None] if attn.q_bias is not None else torch.zeros(H, D, dtype=F64)
    kb = attn.k_bias.to(F64)[kv] * a_qk[:, None] if attn.k_bias is not None else torch.zeros(H, D, dtype=F64)
    in_proj = torch.cat([
        torch.zeros(I, hidden, dtype=F64), xrows.reshape(I, hidden), k.reshape(H * D, hidden), q.reshape(H * D, hidden),
        torch.zeros(H, hidden, dtype=F64),
    ])
    in_bias = torch.cat([
        torch.full((I,), gate_bias, dtype=F64), xbias.reshape(-1), (kb + shift[:, None]).reshape(-1),
        (qb + shift[:, None]).reshape(-1), torch.zeros(H, dtype=F64),
    ])
    conv = torch.zeros(dims.conv_dim, 1, dims.d_conv, dtype=F64)
    conv[:, 0, -1] = 1.0
    dt0 = F.softplus(torch.tensor(DT0_BIAS, dtype=F64))
    # lambda = exp(-dt0 * exp(A_log))  ->  A_log = log(-log(lambda) / dt0)
    A_log = torch.log(-torch.log(decays.to(F64).clamp(1e-6, 1 - 1e-6)) / dt0)
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    return Mamba2Weights(
        in_proj=f32(in_proj), conv_weight=f32(conv), dt_bias=f32(torch.full((H,), DT0_BIAS, dtype=F64)), A_log=f32(A_log),
        D=f32(torch.zeros(H, dtype=F64)), norm=f32(norm_w), out_proj=f32(Wout), in_proj_bias=f32(in_bias),
        conv_bias=f32(torch.zeros(dims.conv_dim, dtype=F64)), out_proj_bias=f32(out_bias),
    )


# ----------------------------------------------------------------------------------------------
# Gated DeltaNet (Qwen3 -> Qwen3.5)
# ----------------------------------------------------------------------------------------------


@dataclass
class GdnInit:
    decays: tuple[float, ...] = (0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
    qk_scales: tuple[float, ...] = (0.1, 1.0)  # pre-silu scale of q/k (after folding the RMSNorm weight)
    v_scale: float = 1.0  # values are normalised per head at the output, so only silu's shape matters
    fit_tokens: int = 2048
    refit_tokens: int = 16384
    ridge: float = 1e-2


def gdn_from_attention(
    attn: AttentionWeights,
    x: torch.Tensor,
    dims: GdnDims,
    *,
    eps: float,
    init: GdnInit | None = None,
    target: torch.Tensor | None = None,
) -> tuple[GdnWeights, dict]:
    """A Gated DeltaNet layer initialised from a Qwen3 attention layer and calibrated on ``x``.

    q -> q (query heads), k -> k, v -> v (KV heads repeated), o -> out_proj (least-squares refit).
    The q/k RMSNorm weights are folded into the projections (the DeltaNet l2-normalises q and k
    itself). beta = sigmoid(0) = 1/2 (in_proj_b = 0); decay per head from a grid (in_proj_a = 0,
    ``g = -exp(A_log) softplus(dt_bias)``). The output gate has no bias, so it cannot be a constant:
    ``in_proj_z`` is fitted by least squares so ``silu(z)`` predicts each head's attention output
    RMS per token, which also restores the magnitude the per-head RMSNorm removes.
    """
    init = init or GdnInit()
    _check_gdn_layout(attn, dims)
    H, D, hidden = attn.q.shape
    x = _batch(x)
    OtO = torch.einsum("ihd,ihe->hde", attn.o.to(F64), attn.o.to(F64))

    # 1. per-head q/k scale and decay, on the fit tokens
    err_fit, a_qk, decays = _gdn_grid(attn, _fit_windows(x, init.fit_tokens), OtO, eps, init)

    # 2. the output gate, then out_proj, on the refit tokens
    xr = _fit_windows(x, init.refit_tokens)
    Nr = xr.shape[0] * xr.shape[1]
    n = _gdn_normed_heads(attn, xr, a_qk, decays, eps, init.v_scale).reshape(Nr, H, D)
    zr = head_outputs(attn, xr).reshape(Nr, H, D)
    U, gate, scale = _gdn_gate(n, zr, OtO, xr.reshape(Nr, hidden).to(F64))
    feats = (n * gate[..., None]).reshape(Nr, H * D)
    y_att = attention_output(attn, xr).reshape(Nr, hidden) if target is None else _fit_windows(target, init.refit_tokens).reshape(Nr, hidden).to(F64)
    Wout = ridge_towards(feats, y_att, attn.o.to(F64).reshape(hidden, H * D), init.ridge)
    err = relative_mse(feats @ Wout.T, y_att)

    weights = _gdn_weights(attn, dims, a_qk, decays, U, Wout, init)
    info = {
        "decay": [round(float(d), 4) for d in decays],
        "qk_scale": [round(float(s), 3) for s in a_qk],
        "head_rel_err_fit": [round(float(e), 4) for e in err_fit],
        "gate_r2": float(1 - ((gate - scale).pow(2).sum() / (scale - scale.mean(0)).pow(2).sum().clamp_min(1e-300))),
        "rel_mse_init": err,
        "refit_tokens": int(Nr),
    }
    return weights, info


def _check_gdn_layout(attn: AttentionWeights, dims: GdnDims) -> None:
    H, D, hidden = attn.q.shape
    if (dims.n_k_heads, dims.n_v_heads, dims.dk, dims.dv, dims.hidden) != (H, H, D, D, hidden):
        raise KvSurgeonError(f"Gated DeltaNet layout {dims} does not match the attention (H={H}, D={D})")
    if attn.q_bias is not None or attn.k_bias is not None or attn.v_bias is not None or attn.o_bias is not None:
        raise KvSurgeonError("Gated DeltaNet init: attention biases have no place in the layout")


def _qk_norm_weights(attn: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k RMSNorm weights (D,) float64 (ones without norms)."""
    D = attn.q.shape[1]
    qn = attn.q_norm.to(F64) if attn.q_norm is not None else torch.ones(D, dtype=F64)
    kn = attn.k_norm.to(F64) if attn.k_norm is not None else torch.ones(D, dtype=F64)
    return qn, kn


def _gdn_normed_heads(attn, xw, a_qk, decays, eps: float, v_scale: float, dtype=torch.float32) -> torch.Tensor:
    """The Gated DeltaNet heads (transformers' own chunked rule) on xw (B, T, hidden) with per-head
    q/k scale a_qk and decay, each head's output RMS-normalised: (B, T, H, D) float64."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    H = attn.q.shape[0]
    qn, kn = _qk_norm_weights(attn)
    q, k, v = _projections(attn, xw, F64)
    # fold the norm weights (the norm's 1/rms is replaced by the DeltaNet's l2norm)
    q = F.silu(q * qn * a_qk[:, None]).to(dtype)
    k = F.silu(k * kn * a_qk[:, None]).to(dtype)
    v = F.silu(v * v_scale).to(dtype)
    Bsz, T = q.shape[:2]
    g = torch.log(decays.to(torch.float32)).expand(Bsz, T, H).contiguous()
    beta = torch.full((Bsz, T, H), 0.5)
    o, _ = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    o = o.to(F64)
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)


def _gdn_grid(attn: AttentionWeights, xf: torch.Tensor, OtO: torch.Tensor, eps: float, init: GdnInit):
    """Per head, the q/k scale (``init.qk_scales``) and decay (``init.decays``) whose normalised output,
    times the best per-token scalar (what the gate can supply), is closest to the head's attention
    output under the metric O_h^T O_h. Returns (relative error, scale, decay), each (H,)."""
    H, D, _ = attn.q.shape
    Nf = xf.shape[0] * xf.shape[1]
    z_att = head_outputs(attn, xf).reshape(Nf, H, D)
    best = (torch.full((H,), float("inf"), dtype=F64), torch.zeros(H, dtype=F64), torch.zeros(H, dtype=F64))
    for s in init.qk_scales:
        for lam in init.decays:
            n = _gdn_normed_heads(attn, xf, torch.full((H,), s, dtype=F64), torch.full((H,), lam), eps, init.v_scale).reshape(Nf, H, D)
            # the gate carries a per-token scale: fit it as the best per-token, per-head scalar
            scale = (_quad_tok(n, OtO, z_att) / _quad_tok(n, OtO, n).clamp_min(1e-30)).clamp_min(0)
            e = z_att - scale[..., None] * n
            err = _quad(e, OtO, e) / _quad(z_att, OtO, z_att).clamp_min(1e-300)
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, torch.full_like(best[1], s), best[1]), torch.where(better, torch.full_like(best[2], lam), best[2]))
    return best


def _gdn_gate(n: torch.Tensor, z: torch.Tensor, OtO: torch.Tensor, X: torch.Tensor):
    """The output gate: the per-token, per-head scale (N, H) taking the normalised heads n (N, H, D) to
    the attention heads z, and ``in_proj_z`` rows U (H, hidden) with silu(X U^T) ~ that scale (least
    squares on z = silu^-1(scale)). X: (N, hidden). Returns (U, gate silu(X U^T), scale)."""
    scale = (_quad_tok(n, OtO, z) / _quad_tok(n, OtO, n).clamp_min(1e-30)).clamp_min(1e-4)
    zt = _silu_inverse_t(scale)  # (N, H)
    U = ridge_solve(X.T @ X, X.T @ zt, 1e-3).T  # (H, hidden)
    return U, F.silu(X @ U.T), scale


def _gdn_weights(attn: AttentionWeights, dims: GdnDims, a_qk, decays, U, Wout, init: GdnInit) -> GdnWeights:
    H, D, hidden = attn.q.shape
    kv = attn.kv_index()
    qn, kn = _qk_norm_weights(attn)
    q_rows = attn.q.to(F64) * (qn * 1)[None, :, None] * a_qk[:, None, None]
    k_rows = attn.k.to(F64)[kv] * kn[None, :, None] * a_qk[:, None, None]
    v_rows = attn.v.to(F64)[kv] * init.v_scale
    conv = torch.zeros(dims.conv_dim, 1, dims.d_conv, dtype=F64)
    conv[:, 0, -1] = 1.0
    dt0 = F.softplus(torch.tensor(DT0_BIAS, dtype=F64))
    A_log = torch.log(-torch.log(decays.clamp(1e-6, 1 - 1e-6)) / dt0)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    return GdnWeights(
        in_proj_qkv=f32(torch.cat([q_rows.reshape(H * D, hidden), k_rows.reshape(H * D, hidden), v_rows.reshape(H * D, hidden)])),
        in_proj_z=f32(U.repeat_interleave(D, dim=0)),
        in_proj_b=f32(torch.zeros(H, hidden, dtype=F64)),
        in_proj_a=f32(torch.zeros(H, hidden, dtype=F64)),
        conv_weight=f32(conv),
        dt_bias=f32(torch.full((H,), DT0_BIAS, dtype=F64)),
        A_log=f32(A_log),
        norm=f32(torch.ones(D, dtype=F64)),
        out_proj=f32(Wout),
    )


# ----------------------------------------------------------------------------------------------
# Modules (transformers' own classes) and attention transfer
# ----------------------------------------------------------------------------------------------


def mamba2_module(config: dict, layer: int, weights: Mamba2Weights | None = None, dtype=torch.float32):
    """transformers' ``GraniteMoeHybridMambaLayer`` for ``config`` (a GraniteMoeHybrid config dict),
    filled with ``weights``."""
    from transformers import AutoConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    cfg = AutoConfig.for_model(**config)
    m = GraniteMoeHybridMambaLayer(cfg, layer).to(dtype)
    if weights is not None:
        m.load_state_dict({k: v.to(dtype) for k, v in weights.state_dict().items()}, strict=True)
    return m.eval()


def gdn_module(config: dict, layer: int, weights: GdnWeights | None = None, dtype=torch.float32):
    """transformers' ``Qwen3_5GatedDeltaNet`` for ``config`` (a qwen3_5_text config dict)."""
    from transformers import AutoConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = AutoConfig.for_model(**config)
    m = Qwen3_5GatedDeltaNet(cfg, layer).to(dtype)
    if weights is not None:
        m.load_state_dict({k: v.to(dtype) for k, v in weights.state_dict().items()}, strict=True)
    return m.eval()


@torch.no_grad()
def linear_layer_output(module: torch.nn.Module, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """module(x) over windows of x (B, T, hidden), in the module's dtype, eval mode."""
    was = module.training
    module.eval()
    p = next(module.parameters())
    out = torch.cat([module(x[i : i + batch].to(p.dtype)) for i in range(0, x.shape[0], batch)])
    module.train(was)
    return out


@dataclass
class TransferResult:
    steps: int
    tokens: int  # training tokens processed (steps x batch tokens)
    train_windows: int
    val_windows: int
    val_rel_mse_before: float
    val_rel_mse_after: float
    train_rel_mse_after: float
    seconds: float
    restored: bool = False  # training made the held-out error worse: initial weights kept
    val_rel_mse_trained: float | None = None  # the held-out error training reached (above before when restored)
    history: list = field(default_factory=list)  # (step, train rel-MSE) every log_every steps

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def attention_transfer(
    linear_layer_module: torch.nn.Module,
    x: torch.Tensor,
    target_y: torch.Tensor,
    steps: int,
    lr: float = 3e-4,
    *,
    lr_1d: float | None = None,
    batch_windows: int = 2,
    val_windows: int | None = None,
    warmup: int | None = None,
    grad_clip: float = 1.0,
    seed: int = 0,
    log_every: int = 10,
    params: Callable[[torch.nn.Module], list] | None = None,
    restore_if_worse: bool = True,
) -> TransferResult:
    """Attention transfer: train ``linear_layer_module`` (in place) so ``module(x)`` matches the
    attention output ``target_y`` (relative MSE), LoLCATs / RADLADS stage 1.

    x, target_y: (N, T, hidden) windows (positions from 0); the last ``val_windows`` (default 1/8,
    at least 1 when N > 1) are held out and reported. ``torch.optim.Adam`` (betas 0.9, 0.98, eps
    1e-8, no weight decay) at ``lr``, 1-D parameters at ``lr_1d`` (default ``lr``); transformers'
    ``cosine_with_min_lr`` schedule: linear warmup from 0 over ``warmup`` steps (default
    steps // 10 - 1, none below 20 steps), then cosine decay to 10%; gradient-norm clipping.
    ``params(module)`` selects the trainable parameters (default: all). Runs in the module's dtype;
    no file I/O (an uptraining runner can reuse it as is).
    """
    t0 = time.time()
    x, target_y = _batch(x), _batch(target_y)
    train_idx, val_windows = _split_windows(x.shape[0], val_windows)
    val_x, val_y = x[len(train_idx) :], target_y[len(train_idx) :]

    def val_err() -> float:
        return relative_mse(linear_layer_output(linear_layer_module, val_x), val_y) if val_windows else float("nan")

    before = val_err()
    initial = {k: v.detach().clone() for k, v in linear_layer_module.state_dict().items()}
    trainable = params(linear_layer_module) if params else [p for p in linear_layer_module.parameters() if p.requires_grad]
    if warmup is None:  # full rate from step steps // 10 - 1 on, as the earlier (step + 1) / W ramp; none below 20 steps
        warmup = max(1, steps // 10) - 1
    opt, sched = _transfer_optimizer(trainable, steps, lr, lr if lr_1d is None else lr_1d, warmup)
    batches = _window_batches(train_idx, batch_windows, seed)
    tokens, history = _train_steps(linear_layer_module, trainable, opt, sched, x, target_y, train_idx, batches, steps, grad_clip, log_every)
    after = trained = val_err()
    restored = False
    if restore_if_worse and val_windows and after > before:
        linear_layer_module.load_state_dict(initial)
        after, restored = before, True
    k = train_idx[: min(4, len(train_idx))]
    train_err = relative_mse(linear_layer_output(linear_layer_module, x[k]), target_y[k])
    return TransferResult(
        steps=steps, tokens=tokens, train_windows=len(train_idx), val_windows=val_windows,
        val_rel_mse_before=before, val_rel_mse_after=after, train_rel_mse_after=train_err,
        seconds=time.time() - t0, restored=restored, val_rel_mse_trained=trained, history=history,
    )


def _split_windows(n: int, val_windows: int | None) -> tuple[torch.Tensor, int]:
    """Training window indices (the first ones) and the count held out at the end (default 1/8, at
    least 1 when there are two windows or more)."""
    if val_windows is None:
        val_windows = max(1, n // 8) if n > 1 else 0
    if n - val_windows <= 0:
        raise KvSurgeonError("attention transfer needs at least one training window")
    return torch.arange(n - val_windows), val_windows


def _transfer_optimizer(trainable: list, steps: int, lr: float, lr_1d: float, warmup: int):
    """``torch.optim.Adam`` over two groups (weight matrices at ``lr``, 1-D parameters at ``lr_1d``) and
    transformers' warmup-then-cosine schedule down to 10% of each group's rate."""
    from transformers import get_scheduler

    groups = [{"params": [p for p in trainable if p.dim() >= 2], "lr": lr},
              {"params": [p for p in trainable if p.dim() < 2], "lr": lr_1d}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], betas=(0.9, 0.98), eps=1e-8)
    sched = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=max(1, steps),
                          scheduler_specific_kwargs={"min_lr_rate": 0.1})
    return opt, sched


def _window_batches(train_idx: torch.Tensor, batch_windows: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch_windows`` training windows: a seeded shuffle, reshuffled when the
    next batch would not fit (the windows left over are skipped)."""
    g = torch.Generator().manual_seed(seed)
    order, pos = train_idx[torch.randperm(len(train_idx), generator=g)], 0
    while True:
        if pos + batch_windows > len(order):
            order, pos = train_idx[torch.randperm(len(train_idx), generator=g)], 0
        yield order[pos : pos + batch_windows]
        pos += batch_windows


def _train_steps(module, trainable, opt, sched, x, target_y, train_idx, batches, steps: int, grad_clip: float, log_every: int):
    """``steps`` optimiser steps on the relative MSE of module(x) to target_y (the MSE over the training
    windows' mean square). Returns (tokens processed, [(step, loss)] every ``log_every`` steps and last)."""
    dtype = next(module.parameters()).dtype
    denom = target_y[train_idx].to(torch.float64).pow(2).mean().clamp_min(1e-30).to(dtype)
    history, tokens = [], 0
    module.train()
    for step in range(steps):
        idx = next(batches)
        xb, yb = x[idx].to(dtype), target_y[idx].to(dtype)
        loss = (module(xb) - yb).pow(2).mean() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        opt.step()
        sched.step()
        tokens += xb.shape[0] * xb.shape[1]
        if step % log_every == 0 or step == steps - 1:
            history.append((step, round(float(loss.detach()), 5)))
    module.eval()
    return tokens, history
