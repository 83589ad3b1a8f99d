"""Float64 references for softmax attention: the one copy of RoPE and of causal attention that every
transform, refit and test uses.

- ``rope_tables``: inverse frequencies and cos/sin scaling exactly as transformers computes them,
  scaled types (llama3, yarn, linear, ...) through transformers' own rope-init functions.
- ``head_outputs`` / ``attention_output``: GQA/MHA with biases, q/k RMSNorm (per head or over the
  projection, with Gemma's (1 + w)), partial and scaled RoPE, a score scale other than
  head_dim ** -0.5 and Gemma-2's score soft-capping (the neutral ``AttentionWeights`` form),
  optionally in a sliding window (``window=``).
- ``mla_head_outputs`` / ``mla_attention_output``: DeepSeek-V2/V3 MLA (``MlaWeights``), rope frequencies
  from ``mla_rope``.

One layer, causal, positions 0..T-1, no cache; inputs (B, T, hidden) or one sequence (T, hidden).
``tests/test_reference.py`` checks each against transformers' modeling code.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .mla_layout import MlaWeights, interleaved_to_rotate_half
from .neutral import AttentionWeights, RopeSpec

F64 = torch.float64
KV_A_NORM_EPS = 1e-6  # DeepseekV3RMSNorm(config.kv_lora_rank): transformers never passes rms_norm_eps


class RopeTableError(ValueError):
    pass


def rope_tables(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64, rotary_dim // 2) and the cos/sin scaling transformers applies."""
    if rope.rope_type == "default":
        return rope.inv_freq(), 1.0
    if rope.rope_type == "linear":
        return rope.inv_freq() / float(rope.scaling["factor"]), 1.0
    try:
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = dict(rope.scaling, rope_type=rope.rope_type, rope_theta=rope.theta)
        params["partial_rotary_factor"] = rope.partial_rotary_factor
        orig = int(params.get("original_max_position_embeddings", 8192))
        cfg = LlamaConfig(  # only the RoPE fields matter; the length keeps the scaling consistent
            hidden_size=rope.head_dim, num_attention_heads=1, head_dim=rope.head_dim,
            max_position_embeddings=max(int(orig * float(params.get("factor", 1.0))), orig + 1),
            rope_parameters=params,
        )
        inv, scale = ROPE_INIT_FUNCTIONS[rope.rope_type](cfg, "cpu")
    except Exception as e:  # pragma: no cover - depends on transformers internals
        raise RopeTableError(
            f"cannot compute RoPE frequencies for rope_type={rope.rope_type!r} ({e}); pass inv_freq= and "
            f"attention_scaling= explicitly, or use --method mean"
        ) from e
    return inv.to(F64), float(scale)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor | int, scaling: float = 1.0):
    """cos and sin (..., rotary_dim // 2) at ``positions`` (a tensor of any shape, or T for 0..T-1)."""
    pos = torch.arange(positions, dtype=F64) if isinstance(positions, int) else positions.to(F64)
    ang = pos[..., None] * inv_freq.to(F64)
    return ang.cos() * scaling, ang.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rotary_dim`` dims of x (..., T, D); the rest pass through."""
    half = rotary_dim // 2
    a, b, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0, dims=(-1,)) -> torch.Tensor:
    """RMSNorm over ``dims``, multiplied by ``offset + w`` (Gemma: offset 1)."""
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps) * (offset + w.to(F64))


def _qk_norm(attn: AttentionWeights, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """q/k norm of z (heads, T, D): per head, or over every head of the projection at once (OLMo-2;
    w is then (heads, D))."""
    if attn.qk_norm_scope == "projection":
        return rms_norm(z, w[:, None], attn.norm_eps, attn.norm_offset, dims=(0, 2))
    return rms_norm(z, w, attn.norm_eps, attn.norm_offset)


def scores(attn: AttentionWeights, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores (H, T, T) from RoPE'd queries (H, T, D) and keys (G, T, D): scaled, and
    soft-capped when the source caps them (Gemma-2)."""
    s = q @ k[attn.kv_index()].transpose(-1, -2) * attn.score_scale
    return s if attn.softcap is None else torch.tanh(s / attn.softcap) * attn.softcap


def causal_mask(T: int, window: int | None = None, rows: tuple[int, int] | None = None, first_key: int = 0) -> torch.Tensor:
    """(T, T) bool, True where query i may NOT see key j: the future, and with a sliding ``window`` the
    keys ``window`` or more positions back (query i sees i-window+1..i, as transformers' and vLLM's
    sliding_window do). ``rows=(s, e)``, ``first_key``: only that block, (e - s, e - first_key)."""
    s, e = rows or (0, T)
    i = torch.arange(s, e)[:, None]
    j = torch.arange(first_key, e)[None, :]
    hidden = j > i
    return hidden | (i - j >= window) if window else hidden


def causal_softmax(scores: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal attention probabilities from (..., T, T) scores, optionally within a sliding window."""
    return scores.masked_fill(causal_mask(scores.shape[-1], window), float("-inf")).softmax(-1)


# Query rows scored at once. Long calibration windows would otherwise hold several (H, T, T) float64
# tensors (1.2 GB each for 9 heads at 4,096); a block of rows needs only the keys up to its last row.
ROW_BLOCK = 512

ScoreBlock = Callable[[int, int, int], torch.Tensor]  # (first row, end row, first key) -> (..., rows, keys)


def causal_prob_blocks(score_block: ScoreBlock, T: int, window: int | None = None,
                       block: int = ROW_BLOCK) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Causal attention probabilities by blocks of query rows: yields ``(s, e, lo, p)`` with ``p``
    (..., e - s, e - lo) the probabilities of rows s..e-1 over keys lo..e-1 (every key a row may see;
    the rest of its row is zero). ``score_block(s, e, lo)`` gives those rows' scores. Each row's softmax
    is the one ``causal_softmax`` takes over the full row: only masked keys are left out."""
    for s in range(0, T, block):
        e = min(T, s + block)
        lo = max(0, s - window + 1) if window else 0
        yield s, e, lo, score_block(s, e, lo).masked_fill(causal_mask(T, window, (s, e), lo), float("-inf")).softmax(-1)


def causal_attention(score_block: ScoreBlock, v: torch.Tensor, window: int | None = None,
                     block: int = ROW_BLOCK) -> torch.Tensor:
    """``causal_softmax(scores) @ v`` for values v (..., T, Dv), one block of query rows at a time."""
    T = v.shape[-2]
    return torch.cat([p @ v[..., lo:e, :] for _, e, lo, p in causal_prob_blocks(score_block, T, window, block)], -2)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def resolve_rope(attn: AttentionWeights, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float | None = None) -> tuple[torch.Tensor, float]:
    """The RoPE tables to use: given ones, else ``rope_tables(attn.rope)`` (scaling overridable).
    Callers looping over sequences resolve once (scaled types go through transformers each time)."""
    if inv_freq is None:
        inv_freq, scale0 = rope_tables(attn.rope)
        attention_scaling = scale0 if attention_scaling is None else attention_scaling
    return inv_freq, 1.0 if attention_scaling is None else attention_scaling


def source_qk(attn: AttentionWeights, x: torch.Tensor, inv_freq: torch.Tensor | None = None,
              attention_scaling: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (H, T, D) and keys (G, T, D) of one sequence x (T, hidden), after biases, q/k norms and
    RoPE, float64. RoPE tables default to ``rope_tables(attn.rope)``."""
    inv_freq, attention_scaling = resolve_rope(attn, inv_freq, attention_scaling)
    cos, sin = rope_cos_sin(inv_freq, x.shape[-2], attention_scaling)
    x = x.to(F64)
    q = torch.einsum("ti,hdi->htd", x, attn.q.to(F64))
    k = torch.einsum("ti,gdi->gtd", x, attn.k.to(F64))
    if attn.q_bias is not None:
        q = q + attn.q_bias.to(F64)[:, None]
    if attn.k_bias is not None:
        k = k + attn.k_bias.to(F64)[:, None]
    if attn.q_norm is not None:
        q = _qk_norm(attn, q, attn.q_norm)
    if attn.k_norm is not None:
        k = _qk_norm(attn, k, attn.k_norm)
    R = attn.rope.rotary_dim
    return apply_rope(q, cos, sin, R), apply_rope(k, cos, sin, R)


def source_score_block(attn: AttentionWeights, q: torch.Tensor, k: torch.Tensor) -> ScoreBlock:
    """The ``ScoreBlock`` of one sequence's RoPE'd queries (H, T, D) and keys (G, T, D) (``source_qk``)."""
    return lambda s, e, lo: scores(attn, q[:, s:e], k[:, lo:e])


def source_probs(attn: AttentionWeights, x: torch.Tensor, window: int | None = None, **rope_kw) -> torch.Tensor:
    """Attention probabilities (H, T, T) of one sequence x (T, hidden); ``window``: sliding window.
    The whole T x T at once: for short inputs and for checking the blocked paths against."""
    q, k = source_qk(attn, x, **rope_kw)
    return causal_softmax(scores(attn, q, k), window)


def _values(attn: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
    """Values (G, T, Dv) of one sequence x (T, hidden), float64."""
    v = torch.einsum("ti,gdi->gtd", x.to(F64), attn.v.to(F64))
    return v if attn.v_bias is None else v + attn.v_bias.to(F64)[:, None]


def _project(attn: AttentionWeights, z: torch.Tensor) -> torch.Tensor:
    """o_proj (and its bias) of per-head outputs z (B, T, H, Dv) -> (B, T, hidden)."""
    y = torch.einsum("bthv,ihv->bti", z, attn.o.to(F64))
    return y if attn.o_bias is None else y + attn.o_bias.to(F64)


def head_outputs(attn: AttentionWeights, x: torch.Tensor, *, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float | None = None, window: int | None = None) -> torch.Tensor:
    """Per-head causal attention outputs before ``o_proj``, float64, (B, T, H, Dv), scored by blocks of
    query rows. ``window``: a sliding-window layer's window."""
    x = _as_batch(x).to(F64)
    inv_freq, attention_scaling = resolve_rope(attn, inv_freq, attention_scaling)
    kv = attn.kv_index()
    outs = []
    for xb in x:  # one sequence at a time bounds the score memory
        v = _values(attn, xb)[kv]
        q, k = source_qk(attn, xb, inv_freq, attention_scaling)
        outs.append(causal_attention(source_score_block(attn, q, k), v, window).transpose(0, 1))
    return torch.stack(outs)


def received_attention(attn: AttentionWeights, x: torch.Tensor, power: float = 1.0, *,
                       inv_freq: torch.Tensor | None = None, attention_scaling: float | None = None,
                       head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """How much attention each token of one sequence x (T, hidden) receives: the sum over heads and
    later queries of ``p ** power``, (T,) float64, computed by blocks of query rows. ``head_weights``
    (H,): head h's attention counts that many times (None: once)."""
    inv_freq, attention_scaling = resolve_rope(attn, inv_freq, attention_scaling)
    q, k = source_qk(attn, x, inv_freq, attention_scaling)
    got = torch.zeros(x.shape[-2], dtype=F64)
    hw = None if head_weights is None else head_weights.to(F64)
    for _, e, lo, p in causal_prob_blocks(source_score_block(attn, q, k), x.shape[-2]):
        pp = p.pow(power)
        got[lo:e] += pp.sum((0, 1)) if hw is None else hw @ pp.sum(1)
    return got


def attention_output(attn: AttentionWeights, x: torch.Tensor, **kw) -> torch.Tensor:
    """The layer's attention output (after ``o_proj``), float64, (B, T, hidden)."""
    return _project(attn, head_outputs(attn, x, **kw))


def tail_attention_outputs(attn: AttentionWeights, x: torch.Tensor, tail: int,
                           windows: Sequence[int | None]) -> list[torch.Tensor]:
    """The layer's attention output (after ``o_proj``) at the last ``tail`` positions, (B, tail, hidden),
    once per entry of ``windows`` (None: full attention). Queries, keys and values are computed once
    and only the tail rows are scored: ranking layers for windowing compares a few rows, not T x T."""
    x = _as_batch(x).to(F64)
    inv_freq, attention_scaling = resolve_rope(attn)
    kv = attn.kv_index()
    outs: list[list[torch.Tensor]] = [[] for _ in windows]
    for xb in x:
        q, k = source_qk(attn, xb, inv_freq, attention_scaling)
        s = scores(attn, q[:, -tail:], k)  # (H, tail, T)
        v = _values(attn, xb)[kv]
        for out, window in zip(outs, windows):
            p = s.masked_fill(causal_mask(xb.shape[0], window)[-tail:], float("-inf")).softmax(-1)
            out.append((p @ v).transpose(0, 1))
    return [_project(attn, torch.stack(o)) for o in outs]


# ---------------------------------------------------------------------------------------------
# MLA


def mla_rope(w: MlaWeights, rope_theta: float | None = None) -> RopeSpec:
    """The rope the DeepseekV3 config gives the shared rope key: ``info['rope_theta']`` and, for a
    scaled source, ``info['rope_type']`` / ``info['rope_scaling']`` (copied from the source)."""
    Dr = w.qk_rope_head_dim
    theta = w.info["rope_theta"] if rope_theta is None else rope_theta
    return RopeSpec(theta=theta, head_dim=Dr, rotary_dim=Dr, rope_type=w.info.get("rope_type", "default"),
                    scaling=dict(w.info.get("rope_scaling", {})))


def latent_rms(c: torch.Tensor) -> torch.Tensor:
    """kv_a_layernorm's denominator over the latent's last dim."""
    return (c.pow(2).mean(-1) + KV_A_NORM_EPS).sqrt()


def mla_head_outputs(w: MlaWeights, x: torch.Tensor, rope_theta: float | None = None, norm: str = "rms") -> torch.Tensor:
    """Per-head MLA outputs before o_proj, (B, H, T, Dv), float64. ``norm="ideal"`` replaces the
    per-token latent rms by the constant the conversion assumed (``info['norm_r0']``)."""
    x = _as_batch(x).to(F64)
    R, Dr, Dn = w.kv_lora_rank, w.qk_rope_head_dim, w.qk_nope_head_dim
    q = torch.einsum("hdi,bti->bhtd", w.q.to(F64), x)
    ckv = torch.einsum("ri,bti->btr", w.kv_a.to(F64), x)
    if w.kv_a_bias is not None:
        ckv = ckv + w.kv_a_bias.to(F64)
    c, k_pe = ckv[..., :R], ckv[..., R:]
    rho = latent_rms(c)[..., None] if norm == "rms" else torch.full_like(c[..., :1], w.info.get("norm_r0", 1.0))
    c = w.kv_a_norm.to(F64) * c / rho
    kv = torch.einsum("hdr,btr->bhtd", w.kv_b.to(F64), c)
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    q_nope, q_rope = q[..., :Dn], q[..., Dn:]
    k_pe = k_pe[:, None]
    if w.rope_interleaved:
        q_rope, k_pe = interleaved_to_rotate_half(q_rope, -1), interleaved_to_rotate_half(k_pe, -1)
    inv, scale = rope_tables(mla_rope(w, rope_theta))
    cos, sin = rope_cos_sin(inv, x.shape[1], scale)
    q_rope, k_pe = apply_rope(q_rope, cos, sin, Dr), apply_rope(k_pe, cos, sin, Dr)
    qq = torch.cat([q_nope, q_rope], -1)
    kk = torch.cat([k_nope, k_pe.expand(-1, qq.shape[1], -1, -1)], -1)
    scale = (Dn + Dr) ** -0.5
    out = [causal_attention(lambda s, e, lo: qq[b, :, s:e] @ kk[b, :, lo:e].transpose(-1, -2) * scale, v[b])
           for b in range(x.shape[0])]
    return torch.stack(out)


def mla_attention_output(w: MlaWeights, x: torch.Tensor, rope_theta: float | None = None, norm: str = "rms") -> torch.Tensor:
    """DeepseekV3 attention output (B, T, hidden), float64."""
    y = torch.einsum("xhd,bhtd->btx", w.o.to(F64), mla_head_outputs(w, x, rope_theta, norm))
    return y if w.o_bias is None else y + w.o_bias.to(F64)
