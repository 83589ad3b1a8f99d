"""Plain recurrent references of the linear-attention layers the hybrids use, one token at a time
in float64: what the chunked PyTorch fallbacks in transformers and the fused GPU kernels must agree
with (flash-linear-attention style: every fused op has a readable reference it is tested against).

Both follow transformers 5.23 exactly (``GraniteMoeHybridMambaLayer`` and ``Qwen3_5GatedDeltaNet``,
formulas in ``hybrid_layout``), including the causal depthwise conv with its rolling state, so the
final states returned here are the cache tensors transformers keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hybrid_layout import GdnDims, GdnWeights, Mamba2Dims, Mamba2Weights

F64 = torch.float64

__all__ = ["LinearState", "mamba2_recurrent", "gdn_recurrent"]


@dataclass
class LinearState:
    """Per-sequence state of one linear layer after the last token.

    conv: (B, conv_dim, K) the last K conv inputs (oldest first), as transformers' conv cache
    ssm:  Mamba2 (B, nh, dh, N) / Gated DeltaNet (B, nv, dk, dv)
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(F64)


def _conv_step(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One output of a causal depthwise conv: window (B, C, K) oldest first, weight (C, 1, K)."""
    out = (window * weight[:, 0, :]).sum(-1)
    return out if bias is None else out + bias


def mamba2_recurrent(
    w: Mamba2Weights,
    dims: Mamba2Dims,
    x: torch.Tensor,
    *,
    eps: float,
    time_step_limit: tuple[float, float] = (0.0, float("inf")),
    state: LinearState | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Mamba2 mixer on x (B, T, hidden), token by token. Returns (y (B, T, hidden) float64, final state)."""
    x = x.to(F64)
    Bsz, T, _ = x.shape
    nh, dh, ng, N, K = dims.n_heads, dims.head_dim, dims.n_groups, dims.d_state, dims.d_conv
    I, conv_dim = dims.inner, dims.conv_dim
    rep = nh // ng
    W_in, b_in = _d(w.in_proj), _d(w.in_proj_bias)
    conv_w, conv_b = _d(w.conv_weight), _d(w.conv_bias)
    A = -torch.exp(_d(w.A_log))
    dt_bias, Dskip, norm_w = _d(w.dt_bias), _d(w.D), _d(w.norm)
    W_out, b_out = _d(w.out_proj), _d(w.out_proj_bias)

    window = x.new_zeros(Bsz, conv_dim, K) if state is None else state.conv.to(F64).clone()
    S = x.new_zeros(Bsz, nh, dh, N) if state is None else state.ssm.to(F64).clone()
    ys = []
    for t in range(T):
        zxbcdt = x[:, t] @ W_in.T
        if b_in is not None:
            zxbcdt = zxbcdt + b_in
        z, xBC, dt = torch.split(zxbcdt, [I, conv_dim, nh], dim=-1)
        window = torch.cat([window[:, :, 1:], xBC[:, :, None]], dim=-1)
        xBC = F.silu(_conv_step(window, conv_w, conv_b))
        xs, Bm, Cm = torch.split(xBC, [I, ng * N, ng * N], dim=-1)
        xs = xs.view(Bsz, nh, dh)
        Bm = Bm.view(Bsz, ng, N).repeat_interleave(rep, dim=1)  # head h reads group h // rep
        Cm = Cm.view(Bsz, ng, N).repeat_interleave(rep, dim=1)
        dt = F.softplus(dt + dt_bias).clamp(time_step_limit[0], time_step_limit[1])  # (B, nh)
        decay = torch.exp(dt * A)  # (B, nh)
        S = decay[:, :, None, None] * S + (dt[:, :, None] * xs)[..., None] * Bm[:, :, None, :]
        y = (S @ Cm[..., None])[..., 0] + Dskip[None, :, None] * xs  # (B, nh, dh)
        g = y.reshape(Bsz, I) * F.silu(z)
        g = g.view(Bsz, ng, I // ng)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
        out = (g.reshape(Bsz, I) * norm_w) @ W_out.T
        ys.append(out if b_out is None else out + b_out)
    return torch.stack(ys, 1), LinearState(conv=window, ssm=S)


def _l2norm(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + eps)


def gdn_recurrent(
    w: GdnWeights,
    dims: GdnDims,
    x: torch.Tensor,
    *,
    eps: float,
    state: LinearState | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Gated DeltaNet on x (B, T, hidden), token by token. Returns (y (B, T, hidden) float64, final state)."""
    x = x.to(F64)
    Bsz, T, _ = x.shape
    nk, nv, dk, dv, K = dims.n_k_heads, dims.n_v_heads, dims.dk, dims.dv, dims.d_conv
    rep = nv // nk
    W_qkv, W_z, W_b, W_a = _d(w.in_proj_qkv), _d(w.in_proj_z), _d(w.in_proj_b), _d(w.in_proj_a)
    conv_w = _d(w.conv_weight)
    A = -torch.exp(_d(w.A_log))
    dt_bias, norm_w, W_out = _d(w.dt_bias), _d(w.norm), _d(w.out_proj)

    window = x.new_zeros(Bsz, dims.conv_dim, K) if state is None else state.conv.to(F64).clone()
    S = x.new_zeros(Bsz, nv, dk, dv) if state is None else state.ssm.to(F64).clone()
    ys = []
    for t in range(T):
        xt = x[:, t]
        window = torch.cat([window[:, :, 1:], (xt @ W_qkv.T)[:, :, None]], dim=-1)
        qkv = F.silu(_conv_step(window, conv_w, None))
        q, k, v = torch.split(qkv, [dims.key_dim, dims.key_dim, dims.value_dim], dim=-1)
        q = _l2norm(q.view(Bsz, nk, dk)).repeat_interleave(rep, dim=1) * dk**-0.5
        k = _l2norm(k.view(Bsz, nk, dk)).repeat_interleave(rep, dim=1)
        v = v.view(Bsz, nv, dv)
        beta = torch.sigmoid(xt @ W_b.T)  # (B, nv)
        g = A * F.softplus(xt @ W_a.T + dt_bias)
        S = S * torch.exp(g)[:, :, None, None]
        kv_mem = (S * k[..., None]).sum(-2)  # (B, nv, dv)
        delta = (v - kv_mem) * beta[..., None]
        S = S + k[..., None] * delta[:, :, None, :]
        o = (S * q[..., None]).sum(-2)  # (B, nv, dv)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * norm_w
        o = o * F.silu((xt @ W_z.T).view(Bsz, nv, dv))
        ys.append(o.reshape(Bsz, nv * dv) @ W_out.T)
    return torch.stack(ys, 1), LinearState(conv=window, ssm=S)
