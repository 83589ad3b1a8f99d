"""DeepSeek MLA (``DeepseekV3ForCausalLM``) as a target layout: weights, config, tensor names.

Layout only; the transforms that fill it live in ``kvsurgeon.convert.mla.fit``.

What ``DeepseekV3Attention`` computes (transformers 5.23, ``q_lora_rank: null``), per token::

    q          = q_proj(x)                         (H, Dn + Dr)   [nope | rope] per head
    c, k_pe    = split(kv_a_proj_with_mqa(x), [R, Dr])
    c          = kv_a_layernorm(c)                 RMSNorm over R, eps 1e-6 (vLLM: rms_norm_eps)
    k_nope, v  = split(kv_b_proj(c), [Dn, Dv])     per head
    k          = [k_nope | rope(k_pe)]             one shared rope key for all heads
    scores     = q . k * (Dn + Dr) ** -0.5

The cache holds ``c`` (R values, before kv_b_proj) and ``k_pe`` (Dr values): ``R + Dr`` values per
token per layer. ``head_dim`` of the config is ``qk_rope_head_dim``: default RoPE then uses
``inv_freq_i = rope_theta ** (-2 i / Dr)``.

Rope rows: with ``rope_interleave: true`` (what vLLM always assumes) the Dr rope rows of ``q`` and
``k_pe`` are laid out as pairs ``(re_0, im_0, re_1, im_1, ...)``; the neutral/rotate-half layout is
``(re_0, ..., re_{Dr/2-1}, im_0, ..., im_{Dr/2-1})``. ``rotate_half_to_interleaved`` converts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .families import head_dim_of

__all__ = [
    "MlaWeights",
    "deepseek_config",
    "write_mla",
    "mla_tensor_names",
    "rotate_half_to_interleaved",
    "interleaved_to_rotate_half",
    "mla_kv_values_per_token",
    "pad_latent",
    "scale_latent",
    "UNTIED_LM_HEAD",
]


@dataclass
class MlaWeights:
    """One layer of DeepSeek MLA attention (no q LoRA), shapes follow ``nn.Linear`` (out, in).

    q:         (H, Dn + Dr, hidden)  rows per head: [nope (Dn) | rope (Dr)]
    kv_a:      (R + Dr, hidden)      latent rows, then the shared rope-key rows
    kv_a_norm: (R,)                  kv_a_layernorm weight
    kv_b:      (H, Dn + Dv, R)       rows per head: [k_nope (Dn) | v (Dv)]
    o:         (hidden, H, Dv)
    kv_a_bias: (R + Dr,) or None     only with ``attention_bias`` (as is o_bias); q_proj never has one
    o_bias:    (hidden,) or None
    rope_interleaved: whether the rope rows of q and kv_a are already in interleaved pair order
        (must match the config's ``rope_interleave``).
    info: free-form measurements from the conversion (ranks, rms statistics, ...); not written.
    """

    q: torch.Tensor
    kv_a: torch.Tensor
    kv_a_norm: torch.Tensor
    kv_b: torch.Tensor
    o: torch.Tensor
    kv_a_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    rope_interleaved: bool = True
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        H, Dq, hidden = self.q.shape
        R = self.kv_a_norm.shape[0]
        Dr = self.kv_a.shape[0] - R
        if Dr < 0 or self.kv_a.shape[1] != hidden:
            raise ValueError(f"kv_a has shape {tuple(self.kv_a.shape)}, expected (R + Dr, {hidden}) with R={R}")
        Dn = Dq - Dr
        if Dn < 0:
            raise ValueError(f"q rows per head ({Dq}) fewer than the rope dim ({Dr})")
        if self.kv_b.shape[0] != H or self.kv_b.shape[2] != R or self.kv_b.shape[1] < Dn:
            raise ValueError(f"kv_b has shape {tuple(self.kv_b.shape)}, expected ({H}, {Dn} + Dv, {R})")
        Dv = self.kv_b.shape[1] - Dn
        if tuple(self.o.shape) != (hidden, H, Dv):
            raise ValueError(f"o has shape {tuple(self.o.shape)}, expected {(hidden, H, Dv)}")
        if self.kv_a_bias is not None and tuple(self.kv_a_bias.shape) != (R + Dr,):
            raise ValueError(f"kv_a_bias has shape {tuple(self.kv_a_bias.shape)}, expected {(R + Dr,)}")
        if self.o_bias is not None and tuple(self.o_bias.shape) != (hidden,):
            raise ValueError(f"o_bias has shape {tuple(self.o_bias.shape)}, expected {(hidden,)}")

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.q.shape[2]

    @property
    def kv_lora_rank(self) -> int:
        return self.kv_a_norm.shape[0]

    @property
    def qk_rope_head_dim(self) -> int:
        return self.kv_a.shape[0] - self.kv_lora_rank

    @property
    def qk_nope_head_dim(self) -> int:
        return self.q.shape[1] - self.qk_rope_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.kv_b.shape[1] - self.qk_nope_head_dim

    @property
    def has_bias(self) -> bool:
        return self.kv_a_bias is not None or self.o_bias is not None

    def to(self, dtype: torch.dtype) -> "MlaWeights":
        def cast(t):
            return None if t is None else t.to(dtype)

        return MlaWeights(
            q=cast(self.q), kv_a=cast(self.kv_a), kv_a_norm=cast(self.kv_a_norm), kv_b=cast(self.kv_b),
            o=cast(self.o), kv_a_bias=cast(self.kv_a_bias), o_bias=cast(self.o_bias),
            rope_interleaved=self.rope_interleaved, info=dict(self.info),
        )


def scale_latent(w: MlaWeights, gain: float) -> MlaWeights:
    """The latent rows of kv_a (and their bias) times ``gain``. kv_a_layernorm divides the scale out
    again (``RMSNorm(g c) = w c / sqrt(ms + eps / g^2)``), so only the weight of eps changes: used to
    make eps negligible, since transformers applies 1e-6 and vLLM ``rms_norm_eps``, and only a latent
    far above both makes the engines agree."""
    R = w.kv_lora_rank
    g = torch.ones(w.kv_a.shape[0], dtype=w.kv_a.dtype)
    g[:R] = gain
    return MlaWeights(
        q=w.q, kv_a=w.kv_a * g[:, None], kv_a_norm=w.kv_a_norm, kv_b=w.kv_b, o=w.o,
        kv_a_bias=None if w.kv_a_bias is None else w.kv_a_bias * g, o_bias=w.o_bias,
        rope_interleaved=w.rope_interleaved,
        info={**w.info, "latent_gain": gain, **({"norm_r0": w.info["norm_r0"] * gain} if "norm_r0" in w.info else {})},
    )


def pad_latent(w: MlaWeights, kv_lora_rank: int) -> MlaWeights:
    """The same attention with a latent of ``kv_lora_rank`` (R') >= R values, for engines that only
    take certain latent sizes (vLLM: ``kv_lora_rank + qk_rope_head_dim`` = 576). Exact, eps included.

    The latent rows of kv_a (and their bias) are scaled by ``a = sqrt(R'/R)`` and R' - R zero rows
    appended; kv_b gets zero columns; the norm weight is divided by ``a`` (0 on the padding). The
    mean square over R' dims of ``[a c; 0]`` is ``a^2 (R/R') ms_R(c) = ms_R(c)``, so the RMSNorm sees
    the same ``ms + eps`` and ``(w/a) (a c) / sqrt(ms + eps) = w c / sqrt(ms + eps)``. (Rescaling only
    the weight by ``sqrt(R'/R)`` would be exact only up to eps, which it would scale by R'/R.)
    """
    R, Dr = w.kv_lora_rank, w.qk_rope_head_dim
    if kv_lora_rank < R:
        raise ValueError(f"cannot pad a latent of {R} values down to {kv_lora_rank}")
    if kv_lora_rank == R:
        return w
    pad = kv_lora_rank - R
    a = (kv_lora_rank / R) ** 0.5

    def rows(t: torch.Tensor) -> torch.Tensor:  # (R + Dr, ...) -> (R' + Dr, ...)
        return torch.cat([t[:R] * a, t.new_zeros((pad, *t.shape[1:])), t[R:]])

    return MlaWeights(
        q=w.q, kv_a=rows(w.kv_a), kv_a_norm=torch.cat([w.kv_a_norm / a, w.kv_a_norm.new_zeros(pad)]),
        kv_b=torch.cat([w.kv_b, w.kv_b.new_zeros((*w.kv_b.shape[:2], pad))], dim=2), o=w.o,
        kv_a_bias=None if w.kv_a_bias is None else rows(w.kv_a_bias), o_bias=w.o_bias,
        rope_interleaved=w.rope_interleaved, info=dict(w.info, padded_from=R),
    )


# ---------------------------------------------------------------------------------------------
# rope row order


def _interleave_perm(n: int) -> torch.Tensor:
    if n % 2:
        raise ValueError(f"rope dim must be even, got {n}")
    half = n // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)


def rotate_half_to_interleaved(rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Reorder the ``n`` rope entries along ``dim`` from rotate-half ``(re..., im...)`` to pairs
    ``(re_0, im_0, re_1, im_1, ...)``: ``out[2i] = rows[i]``, ``out[2i+1] = rows[i + n/2]``."""
    return rows.index_select(dim, _interleave_perm(rows.shape[dim]).to(rows.device))


def interleaved_to_rotate_half(rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Inverse of ``rotate_half_to_interleaved``."""
    inv = torch.argsort(_interleave_perm(rows.shape[dim]))
    return rows.index_select(dim, inv.to(rows.device))


# ---------------------------------------------------------------------------------------------
# config

# Source keys copied verbatim when present (special tokens, vocab, MLP, norms, context length).
_COPIED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


def deepseek_config(
    source_config: Mapping[str, Any],
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    qk_nope_head_dim: int,
    v_head_dim: int | None = None,
    rope_theta: float | None = None,
    *,
    rope_interleave: bool = True,
    attention_bias: bool = False,
    rope_parameters: Mapping[str, Any] | None = None,
) -> dict:
    """A complete ``DeepseekV3ForCausalLM`` config dict for a Llama-like source config.

    Every MLP is dense (``first_k_dense_replace = num_hidden_layers``; the MoE fields are set to
    small valid values and create no modules), no q LoRA, no MTP layers, ``num_key_value_heads =
    num_attention_heads`` (required by transformers' MLA), default RoPE with ``rope_theta`` (the
    source's unless given; the MLA rope dim only holds ``qk_rope_head_dim / 2`` frequencies, see
    ``kvsurgeon.convert.mla.fit.rope_theta_for``). ``rope_parameters`` overrides the RoPE block verbatim
    (non-default RoPE: transformers follows it, vLLM does not).
    """
    tc = source_config.get("text_config")
    src = dict(tc) if isinstance(tc, Mapping) and "num_hidden_layers" in tc else dict(source_config)

    if src.get("mlp_bias"):
        raise ValueError("source MLP has biases; DeepseekV3MLP has none")
    H = int(src["num_attention_heads"])
    L = int(src["num_hidden_layers"])
    if v_head_dim is None:
        v_head_dim = head_dim_of(src)
    if rope_parameters is None:
        if rope_theta is None:
            params = src.get("rope_parameters") or src.get("rope_scaling") or {}
            rope_theta = params.get("rope_theta") or src.get("rope_theta") or 10000.0
        rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    cfg: dict[str, Any] = {k: src[k] for k in _COPIED if k in src}
    # vLLM's DeepseekV2/V3 ignores tie_word_embeddings and leaves lm_head unloaded (garbage logits)
    # when the checkpoint has no lm_head.weight: always write an untied lm_head (a tied source's
    # embedding copied; see UNTIED_LM_HEAD)
    cfg["tie_word_embeddings"] = False
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("hidden_act", "silu")
    cfg.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        num_key_value_heads=H,
        q_lora_rank=None,
        kv_lora_rank=int(kv_lora_rank),
        qk_rope_head_dim=int(qk_rope_head_dim),
        qk_nope_head_dim=int(qk_nope_head_dim),
        v_head_dim=int(v_head_dim),
        head_dim=int(qk_rope_head_dim),  # what DeepseekV3Config sets; default RoPE reads it
        rope_parameters=dict(rope_parameters),
        rope_interleave=bool(rope_interleave),
        attention_bias=bool(attention_bias),
        # dense everywhere: no MoE module is built when first_k_dense_replace == num_hidden_layers
        first_k_dense_replace=L,
        moe_layer_freq=1,
        n_routed_experts=1,
        n_shared_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=int(src["intermediate_size"]),
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        num_nextn_predict_layers=0,  # no MTP module (transformers key: num_mtp_layers)
        use_cache=True,
    )
    if "dtype" in src or "torch_dtype" in src:
        cfg["dtype"] = src.get("dtype") or src.get("torch_dtype")
    return cfg


UNTIED_LM_HEAD = {"lm_head.weight": "model.embed_tokens.weight"}  # written from the embedding when missing


def mla_kv_values_per_token(config: Mapping[str, Any]) -> int:
    """Cached values per token per layer of a DeepSeek MLA config: ``kv_lora_rank + qk_rope_head_dim``."""
    return int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])


# ---------------------------------------------------------------------------------------------
# tensors


def mla_tensor_names(layer: int, attention_bias: bool = False, prefix: str = "model.layers.{i}.self_attn.") -> list[str]:
    p = prefix.format(i=layer)
    names = [p + "q_proj.weight", p + "kv_a_proj_with_mqa.weight", p + "kv_a_layernorm.weight",
             p + "kv_b_proj.weight", p + "o_proj.weight"]
    if attention_bias:
        names += [p + "kv_a_proj_with_mqa.bias", p + "o_proj.bias"]
    return names


def write_mla(w: MlaWeights, layer: int, attention_bias: bool | None = None) -> dict[str, torch.Tensor]:
    """One layer's attention tensors under DeepseekV3's names.

    ``attention_bias`` (the config's flag; default: whether ``w`` has a bias) decides whether the
    kv_a/o biases are written; missing ones are written as zeros. Rope rows are written as stored
    (see ``MlaWeights.rope_interleaved``).
    """
    if attention_bias is None:
        attention_bias = w.has_bias
    if not attention_bias and w.has_bias:
        raise ValueError("MlaWeights carries biases but attention_bias=False would drop them")
    H, Dq, hidden = w.q.shape
    p = f"model.layers.{layer}.self_attn."
    out = {
        p + "q_proj.weight": w.q.reshape(H * Dq, hidden),
        p + "kv_a_proj_with_mqa.weight": w.kv_a,
        p + "kv_a_layernorm.weight": w.kv_a_norm,
        p + "kv_b_proj.weight": w.kv_b.reshape(H * w.kv_b.shape[1], w.kv_lora_rank),
        p + "o_proj.weight": w.o.reshape(hidden, H * w.v_head_dim),
    }
    if attention_bias:
        out[p + "kv_a_proj_with_mqa.bias"] = w.kv_a_bias if w.kv_a_bias is not None else w.kv_a.new_zeros(w.kv_a.shape[0])
        out[p + "o_proj.bias"] = w.o_bias if w.o_bias is not None else w.q.new_zeros(hidden)
    return {k: v.contiguous() for k, v in out.items()}
