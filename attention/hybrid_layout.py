"""Hybrid targets as layouts: GraniteMoeHybrid (attention + Mamba2) and Qwen3.5 text (attention +
Gated DeltaNet). Configs, tensor names and per-layer weights; layout only, no transforms (those live
in ``kvsurgeon.convert.hybrid.fit``).

GraniteMoeHybrid from a Llama/Mistral/Qwen2 source (transformers 5.23 ``GraniteMoeHybridForCausalLM``,
vLLM ``GraniteMoeHybridForCausalLM``)::

    attention layer  = the source layer bit-exactly: position_embedding_type "rope",
                       attention_multiplier = head_dim ** -0.5, embedding/residual multipliers and
                       logits_scaling 1, num_local_experts 0, shared_mlp = the source MLP
                       (input_linear = [gate_proj; up_proj], output_linear = down_proj).
    mamba layer      = transformers' GraniteMoeHybridMambaLayer:
        zxbcdt = in_proj(x)                 rows [z (I) | x (I) | B (ng*N) | C (ng*N) | dt (nh)]
        xBC    = silu(causal_conv1d(xBC))   depthwise, kernel K, per-channel bias
        dt     = softplus(dt + dt_bias),  A = -exp(A_log)
        S_h   <- exp(dt_h A_h) S_h + dt_h x_h B_g^T      (head h reads group g = h // (nh / ng))
        y_h    = S_h C_g + D_h x_h
        out    = out_proj(norm_weight * groupRMSNorm(y * silu(z)))   groups of I / ng channels

Layer-type names: the config is written with the legacy names ``"attention"`` / ``"mamba"``, which
vLLM's GraniteMoeHybrid registry keys on; transformers >= 5 remaps them to ``"full_attention"`` /
``"linear_attention"`` when it loads the config (``remap_legacy_layer_types``). vLLM's attention
uses ``head_dim = hidden_size // num_attention_heads`` (it ignores ``head_dim``), so sources whose
head_dim differs are refused.

Qwen3.5 text from a Qwen3 source (``Qwen3_5ForCausalLM``, model_type ``qwen3_5_text``): every
RMSNorm except the Gated DeltaNet output norm is zero-centred (stored ``w - 1``); attention has an
output gate (``q_proj`` rows per head are ``[query (D) | gate (D)]``, output ``*= sigmoid(gate)``):
gate rows 0 give 0.5, so ``o_proj`` is stored x2; ``partial_rotary_factor`` 1.0. Gated DeltaNet::

    q, k, v = silu(causal_conv1d(in_proj_qkv(x)))      per key head (q, k) / value head (v)
    q, k    = l2norm(q), l2norm(k);  q *= dk ** -0.5
    beta    = sigmoid(in_proj_b(x)),  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    S      <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q
    out     = out_proj(norm_weight * RMSNorm_per_head(o) * silu(in_proj_z(x)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .families import head_dim_of, rope_spec
from .neutral import AttentionWeights

__all__ = [
    "GRANITE_ATTENTION",
    "GRANITE_MAMBA",
    "QWEN35_ATTENTION",
    "QWEN35_LINEAR",
    "HybridLayoutError",
    "Mamba2Dims",
    "Mamba2Weights",
    "GdnDims",
    "GdnWeights",
    "rope_parameters",
    "granite_hybrid_config",
    "mamba2_dims",
    "granite_attention_tensors",
    "granite_mlp_tensors",
    "granite_mamba_names",
    "write_mamba2",
    "read_mamba2",
    "qwen35_text_config",
    "gdn_dims",
    "qwen35_attention_tensors",
    "qwen35_norm_tensor",
    "qwen35_gdn_names",
    "write_gdn",
    "read_gdn",
    "linear_layer_indices",
]

GRANITE_ATTENTION = "attention"  # legacy names: vLLM's registry keys; transformers remaps on load
GRANITE_MAMBA = "mamba"
QWEN35_ATTENTION = "full_attention"
QWEN35_LINEAR = "linear_attention"

_LINEAR_NAMES = {"mamba", "linear_attention"}


class HybridLayoutError(ValueError):
    pass


def linear_layer_indices(config: Mapping[str, Any]) -> list[int]:
    """Indices of the linear-attention layers of a hybrid config (either naming convention)."""
    c = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    return [i for i, t in enumerate(c.get("layer_types") or []) if t in _LINEAR_NAMES]


def rope_parameters(config: Mapping[str, Any], partial_rotary_factor: float | None = None) -> dict:
    """The source's RoPE as a transformers-5 ``rope_parameters`` dict."""
    spec = rope_spec(config)
    out = {"rope_type": spec.rope_type, "rope_theta": spec.theta, **spec.scaling}
    if partial_rotary_factor is not None:
        out["partial_rotary_factor"] = partial_rotary_factor
    return out


def _common(config: Mapping[str, Any]) -> dict:
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
        "bos_token_id", "eos_token_id", "tie_word_embeddings", "hidden_act",
    )
    out = {k: config[k] for k in keys if k in config}
    out["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    out["head_dim"] = head_dim_of(config)
    return out


# ----------------------------------------------------------------------------------------------
# GraniteMoeHybrid (Mamba2)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mamba2Dims:
    hidden: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int

    @property
    def inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj_rows(self) -> int:
        return self.inner + self.conv_dim + self.n_heads

    def split(self) -> list[int]:
        """in_proj row blocks: z, x, B, C, dt."""
        gs = self.n_groups * self.d_state
        return [self.inner, self.inner, gs, gs, self.n_heads]

    @property
    def state_values(self) -> int:
        """Recurrent (SSM) state values per sequence."""
        return self.n_heads * self.head_dim * self.d_state

    @property
    def conv_state_values(self) -> int:
        return self.conv_dim * self.d_conv


def mamba2_dims(config: Mapping[str, Any]) -> Mamba2Dims:
    hidden = int(config["hidden_size"])
    nh = int(config["mamba_n_heads"])
    dh = config.get("mamba_d_head", "auto")
    if dh in (None, "auto"):
        dh = int(config.get("mamba_expand", 2)) * hidden // nh
    return Mamba2Dims(hidden, nh, int(dh), int(config.get("mamba_n_groups", 1)), int(config["mamba_d_state"]), int(config.get("mamba_d_conv", 4)))


def granite_hybrid_config(
    source: Mapping[str, Any],
    linear_layers: list[int],
    *,
    d_state: int | None = None,
    d_conv: int = 4,
    chunk_size: int = 256,
) -> dict:
    """GraniteMoeHybrid config for a Llama/Mistral/Qwen2 source with ``linear_layers`` as Mamba2.

    Mamba2 sizes follow the attention it replaces (MambaInLlama): one Mamba head per query head
    (``mamba_n_heads = H``, ``mamba_d_head = head_dim``), one B/C group per query head
    (``mamba_n_groups = H``, so C can carry each head's own query), ``mamba_d_state = head_dim``.
    ``mamba_proj_bias`` is on: the z-gate gets a constant through the in_proj bias (see
    ``kvsurgeon.convert.hybrid.fit``), and a source ``o_proj`` bias lands in ``out_proj.bias``.
    """
    H = int(source["num_attention_heads"])
    hidden = int(source["hidden_size"])
    D = head_dim_of(source)
    if D * H != hidden:
        raise HybridLayoutError(
            f"GraniteMoeHybrid needs head_dim == hidden_size / num_attention_heads (vLLM computes it that way and "
            f"ignores head_dim); this model has head_dim {D} with hidden_size {hidden} and {H} heads "
            f"({hidden} / {H} = {hidden / H:g}). Use a source with head_dim = hidden/heads, or --linear gated-deltanet "
            f"for Qwen3 sources."
        )
    if source.get("mlp_bias"):
        raise HybridLayoutError("the source MLP has biases (mlp_bias: true); GraniteMoeHybrid's shared MLP has none")
    act = source.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HybridLayoutError(f"GraniteMoeHybrid uses hidden_act for both the MLP and the Mamba2 conv; the source's {act!r} is not silu")
    L = int(source["num_hidden_layers"])
    bad = [i for i in linear_layers if not 0 <= i < L]
    if bad:
        raise HybridLayoutError(f"linear layer indices {bad} out of range 0..{L - 1}")
    lin = set(linear_layers)
    qkv_bias = source.get("model_type") == "qwen2" or bool(source.get("attention_bias", False))
    cfg = {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        **_common(source),
        "rope_parameters": rope_parameters(source),
        "position_embedding_type": "rope",
        "attention_bias": qkv_bias,
        "attention_dropout": 0.0,
        "attention_multiplier": D**-0.5,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "num_local_experts": 0,
        "num_experts_per_tok": 0,
        "output_router_logits": False,
        "shared_intermediate_size": int(source["intermediate_size"]),
        "layer_types": [GRANITE_MAMBA if i in lin else GRANITE_ATTENTION for i in range(L)],
        "mamba_n_heads": H,
        "mamba_d_head": D,
        "mamba_n_groups": H,
        "mamba_d_state": int(d_state or D),
        "mamba_d_conv": int(d_conv),
        "mamba_expand": 1,
        "mamba_chunk_size": int(chunk_size),
        "mamba_conv_bias": True,
        "mamba_proj_bias": True,
    }
    cfg.pop("head_dim")  # GraniteMoeHybrid derives it (hidden / heads); vLLM does too
    return cfg


def _prefix(i: int) -> str:
    return f"model.layers.{i}."


def granite_attention_tensors(attn: AttentionWeights, layer: int, bias: bool) -> dict[str, torch.Tensor]:
    """Attention of one GraniteMoeHybrid layer. With ``bias`` (config ``attention_bias``) q/k/v/o all carry
    biases; missing ones are written as zeros (Qwen2 has none on o_proj)."""
    if attn.q_norm is not None or attn.k_norm is not None:
        raise HybridLayoutError("GraniteMoeHybrid attention has no q/k norms (Qwen3 sources go to Qwen3.5)")
    H, D, hidden = attn.q.shape
    G = attn.num_kv_heads
    p = _prefix(layer) + "self_attn."
    out = {
        p + "q_proj.weight": attn.q.reshape(H * D, hidden),
        p + "k_proj.weight": attn.k.reshape(G * D, hidden),
        p + "v_proj.weight": attn.v.reshape(G * attn.v_head_dim, hidden),
        p + "o_proj.weight": attn.o.reshape(hidden, H * attn.v_head_dim),
    }
    if bias:
        z = attn.q.new_zeros
        out[p + "q_proj.bias"] = (attn.q_bias if attn.q_bias is not None else z(H, D)).reshape(-1)
        out[p + "k_proj.bias"] = (attn.k_bias if attn.k_bias is not None else z(G, D)).reshape(-1)
        out[p + "v_proj.bias"] = (attn.v_bias if attn.v_bias is not None else z(G, attn.v_head_dim)).reshape(-1)
        out[p + "o_proj.bias"] = attn.o_bias if attn.o_bias is not None else z(hidden)
    elif any(b is not None for b in (attn.q_bias, attn.k_bias, attn.v_bias, attn.o_bias)):
        raise HybridLayoutError("attention has biases but the target config has attention_bias false")
    return {k: v.contiguous() for k, v in out.items()}


def granite_mlp_tensors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """The source's SwiGLU MLP as GraniteMoeHybrid's shared MLP: ``input_linear`` = [gate; up]
    (the model computes ``act(chunk0) * chunk1``), ``output_linear`` = down."""
    p = _prefix(layer) + "shared_mlp."
    return {p + "input_linear.weight": torch.cat([gate, up], 0).contiguous(), p + "output_linear.weight": down.contiguous()}


@dataclass
class Mamba2Weights:
    """One GraniteMoeHybrid Mamba2 mixer, shapes as transformers stores them.

    in_proj: (2I + 2 ng N + nh, hidden), rows [z | x | B | C | dt]; in_proj_bias: same rows or None
    conv_weight: (conv_dim, 1, K), conv_bias: (conv_dim,) or None, conv_dim = I + 2 ng N
    dt_bias, A_log, D: (nh,);  norm: (I,);  out_proj: (hidden, I);  out_proj_bias: (hidden,) or None
    """

    in_proj: torch.Tensor
    conv_weight: torch.Tensor
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    norm: torch.Tensor
    out_proj: torch.Tensor
    in_proj_bias: torch.Tensor | None = None
    conv_bias: torch.Tensor | None = None
    out_proj_bias: torch.Tensor | None = None

    def check(self, dims: Mamba2Dims) -> None:
        want = {
            "in_proj": (dims.in_proj_rows, dims.hidden),
            "conv_weight": (dims.conv_dim, 1, dims.d_conv),
            "dt_bias": (dims.n_heads,), "A_log": (dims.n_heads,), "D": (dims.n_heads,),
            "norm": (dims.inner,), "out_proj": (dims.hidden, dims.inner),
            "in_proj_bias": (dims.in_proj_rows,), "conv_bias": (dims.conv_dim,), "out_proj_bias": (dims.hidden,),
        }
        for name, shape in want.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise HybridLayoutError(f"Mamba2 {name} has shape {tuple(t.shape)}, expected {shape}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys of ``GraniteMoeHybridMambaLayer.state_dict()``."""
        out = {
            "in_proj.weight": self.in_proj, "conv1d.weight": self.conv_weight, "dt_bias": self.dt_bias,
            "A_log": self.A_log, "D": self.D, "norm.weight": self.norm, "out_proj.weight": self.out_proj,
        }
        for key, t in (("in_proj.bias", self.in_proj_bias), ("conv1d.bias", self.conv_bias), ("out_proj.bias", self.out_proj_bias)):
            if t is not None:
                out[key] = t
        return out

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "Mamba2Weights":
        return cls(
            in_proj=sd["in_proj.weight"], conv_weight=sd["conv1d.weight"], dt_bias=sd["dt_bias"], A_log=sd["A_log"],
            D=sd["D"], norm=sd["norm.weight"], out_proj=sd["out_proj.weight"], in_proj_bias=sd.get("in_proj.bias"),
            conv_bias=sd.get("conv1d.bias"), out_proj_bias=sd.get("out_proj.bias"),
        )


def granite_mamba_names(layer: int, config: Mapping[str, Any]) -> list[str]:
    p = _prefix(layer) + "mamba."
    names = [p + k for k in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")]
    if config.get("mamba_conv_bias", True):
        names.append(p + "conv1d.bias")
    if config.get("mamba_proj_bias", False):
        names += [p + "in_proj.bias", p + "out_proj.bias"]
    return names


def write_mamba2(w: Mamba2Weights, config: Mapping[str, Any], layer: int) -> dict[str, torch.Tensor]:
    """Tensors of one Mamba2 layer under GraniteMoeHybrid names; biases the config has but ``w`` lacks
    are written as zeros, biases ``w`` has but the config lacks are an error."""
    dims = mamba2_dims(config)
    w.check(dims)
    p = _prefix(layer) + "mamba."
    sd = w.state_dict()
    conv_bias, proj_bias = config.get("mamba_conv_bias", True), config.get("mamba_proj_bias", False)
    for key, on, n in (("conv1d.bias", conv_bias, dims.conv_dim), ("in_proj.bias", proj_bias, dims.in_proj_rows), ("out_proj.bias", proj_bias, dims.hidden)):
        if on and key not in sd:
            sd[key] = w.in_proj.new_zeros(n)
        elif not on and key in sd:
            raise HybridLayoutError(f"Mamba2 weights carry {key} but the config has it switched off")
    return {p + k: v.contiguous() for k, v in sd.items()}


def read_mamba2(source, config: Mapping[str, Any], layer: int) -> Mamba2Weights:
    """Read one Mamba2 layer back from a TensorSource (``get_tensor`` + ``in``)."""
    p = _prefix(layer) + "mamba."
    sd = {k[len(p):]: source.get_tensor(k) for k in granite_mamba_names(layer, config) if k in source}
    return Mamba2Weights.from_state_dict(sd)


# ----------------------------------------------------------------------------------------------
# Qwen3.5 text (Gated DeltaNet)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GdnDims:
    hidden: int
    n_k_heads: int
    n_v_heads: int
    dk: int
    dv: int
    d_conv: int

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.dk

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.dv

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


def gdn_dims(config: Mapping[str, Any]) -> GdnDims:
    c = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    return GdnDims(
        int(c["hidden_size"]), int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"]),
        int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"]), int(c.get("linear_conv_kernel_dim", 4)),
    )


def qwen35_text_config(source: Mapping[str, Any], linear_layers: list[int], *, d_conv: int = 4) -> dict:
    """``Qwen3_5ForCausalLM`` config for a Qwen3 source with ``linear_layers`` as Gated DeltaNet.

    DeltaNet sizes follow the attention: one key head and one value head per query head
    (``linear_num_key_heads = linear_num_value_heads = H``), head dims = ``head_dim``.
    """
    if source.get("model_type") != "qwen3":
        raise HybridLayoutError(f"Qwen3.5 hybrids are built from Qwen3 sources (q/k norms map exactly); got {source.get('model_type')!r}")
    L = int(source["num_hidden_layers"])
    bad = [i for i in linear_layers if not 0 <= i < L]
    if bad:
        raise HybridLayoutError(f"linear layer indices {bad} out of range 0..{L - 1}")
    if source.get("attention_bias"):
        raise HybridLayoutError("Qwen3 source with attention_bias is not supported for Qwen3.5 output")
    H = int(source["num_attention_heads"])
    D = head_dim_of(source)
    lin = set(linear_layers)
    cfg = {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        **_common(source),
        "rope_parameters": rope_parameters(source, partial_rotary_factor=1.0),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": [QWEN35_LINEAR if i in lin else QWEN35_ATTENTION for i in range(L)],
        "linear_conv_kernel_dim": int(d_conv),
        "linear_key_head_dim": D,
        "linear_value_head_dim": D,
        "linear_num_key_heads": H,
        "linear_num_value_heads": H,
    }
    if source.get("sliding_window") and source.get("use_sliding_window"):
        raise HybridLayoutError("Qwen3 sources with use_sliding_window are not supported for Qwen3.5 output")
    return cfg


def qwen35_attention_tensors(attn: AttentionWeights, layer: int) -> dict[str, torch.Tensor]:
    """A Qwen3 attention layer as Qwen3.5 gated attention, exactly: q_proj rows per head are
    [query | gate] with gate rows 0 (sigmoid 0.5), o_proj x2, q/k norms stored as w - 1."""
    if attn.q_norm is None or attn.k_norm is None:
        raise HybridLayoutError("Qwen3.5 attention always applies q/k norms; the source has none (not exact)")
    if any(b is not None for b in (attn.q_bias, attn.k_bias, attn.v_bias, attn.o_bias)):
        raise HybridLayoutError("Qwen3.5 output is written without attention biases")
    H, D, hidden = attn.q.shape
    G = attn.num_kv_heads
    p = _prefix(layer) + "self_attn."
    q = torch.cat([attn.q, torch.zeros_like(attn.q)], dim=1)  # (H, 2D, hidden): [query | gate] per head
    return {
        p + "q_proj.weight": q.reshape(H * 2 * D, hidden).contiguous(),
        p + "k_proj.weight": attn.k.reshape(G * D, hidden).contiguous(),
        p + "v_proj.weight": attn.v.reshape(G * attn.v_head_dim, hidden).contiguous(),
        p + "o_proj.weight": (attn.o * 2).reshape(hidden, H * attn.v_head_dim).contiguous(),
        p + "q_norm.weight": (attn.q_norm - 1).contiguous(),
        p + "k_norm.weight": (attn.k_norm - 1).contiguous(),
    }


def qwen35_norm_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A standard RMSNorm weight as Qwen3.5's zero-centred one (the model multiplies by 1 + w)."""
    return (weight.float() - 1).to(weight.dtype)


@dataclass
class GdnWeights:
    """One Qwen3.5 Gated DeltaNet layer, shapes as transformers stores them.

    in_proj_qkv: (2 nk dk + nv dv, hidden) rows [q | k | v]; in_proj_z: (nv dv, hidden)
    in_proj_b, in_proj_a: (nv, hidden); conv_weight: (conv_dim, 1, K) (no bias)
    dt_bias, A_log: (nv,); norm: (dv,) shared by all heads (plain RMSNorm weight, not zero-centred);
    out_proj: (hidden, nv dv)
    """

    in_proj_qkv: torch.Tensor
    in_proj_z: torch.Tensor
    in_proj_b: torch.Tensor
    in_proj_a: torch.Tensor
    conv_weight: torch.Tensor
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    norm: torch.Tensor
    out_proj: torch.Tensor

    def check(self, dims: GdnDims) -> None:
        want = {
            "in_proj_qkv": (dims.conv_dim, dims.hidden), "in_proj_z": (dims.value_dim, dims.hidden),
            "in_proj_b": (dims.n_v_heads, dims.hidden), "in_proj_a": (dims.n_v_heads, dims.hidden),
            "conv_weight": (dims.conv_dim, 1, dims.d_conv), "dt_bias": (dims.n_v_heads,), "A_log": (dims.n_v_heads,),
            "norm": (dims.dv,), "out_proj": (dims.hidden, dims.value_dim),
        }
        for name, shape in want.items():
            if tuple(getattr(self, name).shape) != shape:
                raise HybridLayoutError(f"GatedDeltaNet {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys of ``Qwen3_5GatedDeltaNet.state_dict()``."""
        return {
            "in_proj_qkv.weight": self.in_proj_qkv, "in_proj_z.weight": self.in_proj_z, "in_proj_b.weight": self.in_proj_b,
            "in_proj_a.weight": self.in_proj_a, "conv1d.weight": self.conv_weight, "dt_bias": self.dt_bias,
            "A_log": self.A_log, "norm.weight": self.norm, "out_proj.weight": self.out_proj,
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "GdnWeights":
        return cls(
            in_proj_qkv=sd["in_proj_qkv.weight"], in_proj_z=sd["in_proj_z.weight"], in_proj_b=sd["in_proj_b.weight"],
            in_proj_a=sd["in_proj_a.weight"], conv_weight=sd["conv1d.weight"], dt_bias=sd["dt_bias"], A_log=sd["A_log"],
            norm=sd["norm.weight"], out_proj=sd["out_proj.weight"],
        )


_GDN_KEYS = ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight", "conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight")


def qwen35_gdn_names(layer: int) -> list[str]:
    return [_prefix(layer) + "linear_attn." + k for k in _GDN_KEYS]


def write_gdn(w: GdnWeights, config: Mapping[str, Any], layer: int) -> dict[str, torch.Tensor]:
    w.check(gdn_dims(config))
    p = _prefix(layer) + "linear_attn."
    return {p + k: v.contiguous() for k, v in w.state_dict().items()}


def read_gdn(source, config: Mapping[str, Any], layer: int) -> GdnWeights:
    p = _prefix(layer) + "linear_attn."
    return GdnWeights.from_state_dict({k: source.get_tensor(p + k) for k in _GDN_KEYS})
