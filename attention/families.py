"""Source families described as data: tensor-name templates and which optional parts exist.

Adding a Llama-like family is one entry in ``FAMILIES``. Reading needs only an object with
``get_tensor(name)`` and ``__contains__`` (``kvsurgeon.convert.io.checkpoint.LazyCheckpoint`` is one),
so this module never touches files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from .neutral import AttentionWeights, RopeSpec


class TensorSource(Protocol):
    def get_tensor(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: object) -> bool: ...


class DictSource(dict):
    """A state dict viewed as a TensorSource (tests, and models already in memory)."""

    def get_tensor(self, name: str) -> torch.Tensor:
        return self[name]


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    model_type: str
    architectures: tuple[str, ...]
    layer_prefix: str = "model.layers.{i}."
    attn: str = "self_attn."
    has_qkv_bias: bool = False  # Qwen2: q/k/v carry biases, o does not
    has_qk_norm: bool = False  # Qwen3: RMSNorm per head on q and k before RoPE
    bias_from_config: bool = True  # Llama/Mistral: `attention_bias` in the config decides
    # How the config turns into per-layer sliding windows (see ``sliding_windows``):
    # "none": the class has no windows; "all": `sliding_window` applies to every layer (transformers'
    # Mistral ignores `layer_types`); "qwen": only with `use_sliding_window`, per `layer_types`;
    # "types": per `layer_types` (Ministral, the ``--to swa`` output class).
    windows: str = "none"
    # Source tensors with no place in any output, mapped to None (dropped), as torchtune's _FROM_HF
    # tables do: checkpoints written by older transformers carry the RoPE table as a buffer.
    legacy: tuple[str, ...] = (
        "model.layers.{i}.self_attn.rotary_emb.inv_freq",
        "model.rotary_emb.inv_freq",
    )

    def is_legacy(self, name: str) -> bool:
        return any(_template_re(t).fullmatch(name) for t in self.legacy)

    def name(self, layer: int, proj: str, kind: str = "weight") -> str:
        return f"{self.layer_prefix.format(i=layer)}{self.attn}{proj}.{kind}"

    def attention_tensor_names(self, layer: int, config: Mapping[str, Any]) -> list[str]:
        names = [self.name(layer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        qkv_bias, o_bias = self.biases(config)
        if qkv_bias:
            names += [self.name(layer, p, "bias") for p in ("q_proj", "k_proj", "v_proj")]
        if o_bias:
            names.append(self.name(layer, "o_proj", "bias"))
        if self.has_qk_norm:
            names += [self.name(layer, "q_norm"), self.name(layer, "k_norm")]
        return names

    def biases(self, config: Mapping[str, Any]) -> tuple[bool, bool]:
        if self.has_qkv_bias:
            return True, False
        b = bool(config.get("attention_bias", False)) if self.bias_from_config else False
        return b, b


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", ("LlamaForCausalLM",)),
        Family("mistral", ("MistralForCausalLM",), windows="all"),
        Family("qwen2", ("Qwen2ForCausalLM",), has_qkv_bias=True, bias_from_config=False, windows="qwen"),
        Family("qwen3", ("Qwen3ForCausalLM",), has_qk_norm=True, windows="qwen"),
        Family("ministral", ("MinistralForCausalLM",), bias_from_config=False, windows="types"),
    )
}


def _template_re(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"\d+"))


def sliding_windows(config: Mapping[str, Any]) -> dict[int, int]:
    """{layer: window} for the layers the source class really windows (empty: all full attention).

    Read as transformers 5 reads it: Qwen2/Qwen3 window only with ``use_sliding_window`` (else the
    window is reset to None), per ``layer_types`` when present, else from ``max_window_layers`` on;
    Mistral windows every layer whenever ``sliding_window`` is set, unless the config has ``layer_types``
    (AutoConfig then loads it as Ministral, which follows them, as Ministral always does). A window at
    least ``max_position_embeddings`` long never drops a token the model may attend to: not a window.
    """
    fam = family_for(config)
    w = config.get("sliding_window")
    L = int(config["num_hidden_layers"])
    if fam.windows == "none" or not w or int(w) >= int(config.get("max_position_embeddings") or 0) > 0:
        return {}
    types = config.get("layer_types")
    if fam.windows == "types" or (fam.windows == "all" and types):
        return {i: int(w) for i, t in enumerate(types or ["sliding_attention"] * L) if t == "sliding_attention"}
    if fam.windows == "all":
        return {i: int(w) for i in range(L)}
    if not config.get("use_sliding_window", False):
        return {}
    if types:
        return {i: int(w) for i, t in enumerate(types) if t == "sliding_attention"}
    first = int(config.get("max_window_layers", L))
    return {i: int(w) for i in range(first, L)}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(config: Mapping[str, Any]) -> Family:
    mt = config.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    archs = ", ".join(config.get("architectures") or []) or "none listed"
    supported = ", ".join(f"{f.model_type} ({', '.join(f.architectures)})" for f in FAMILIES.values())
    raise UnsupportedArchitectureError(
        f"unsupported architecture: model_type={mt!r} (architectures: {archs}). "
        f"kvsurgeon can convert: {supported}."
    )


def head_dim_of(config: Mapping[str, Any]) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else config["hidden_size"] // config["num_attention_heads"]


def rope_spec(config: Mapping[str, Any]) -> RopeSpec:
    """RoPE as the config describes it (transformers 5 `rope_parameters`, or the older flat keys)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    partial = params.pop("partial_rotary_factor", None) or config.get("partial_rotary_factor", 1.0)
    hd = head_dim_of(config)
    rotary = int(hd * float(partial))
    return RopeSpec(theta=float(theta), head_dim=hd, rotary_dim=rotary, rope_type=rope_type, scaling=params)


def read_attention(source: TensorSource, config: Mapping[str, Any], layer: int) -> AttentionWeights:
    """Read one layer's attention into neutral form."""
    fam = family_for(config)
    H = config["num_attention_heads"]
    G = config.get("num_key_value_heads") or H
    D = head_dim_of(config)
    hidden = config["hidden_size"]
    get = source.get_tensor
    qkv_bias, o_bias = fam.biases(config)

    def bias(proj: str, n: int) -> torch.Tensor | None:
        name = fam.name(layer, proj, "bias")
        return get(name).view(n, D) if qkv_bias and name in source else None

    o_name = fam.name(layer, "o_proj", "bias")
    return AttentionWeights(
        q=get(fam.name(layer, "q_proj")).view(H, D, hidden),
        k=get(fam.name(layer, "k_proj")).view(G, D, hidden),
        v=get(fam.name(layer, "v_proj")).view(G, D, hidden),
        o=get(fam.name(layer, "o_proj")).view(hidden, H, D),
        rope=rope_spec(config),
        q_bias=bias("q_proj", H),
        k_bias=bias("k_proj", G),
        v_bias=bias("v_proj", G),
        o_bias=get(o_name) if o_bias and o_name in source else None,
        q_norm=get(fam.name(layer, "q_norm")) if fam.has_qk_norm else None,
        k_norm=get(fam.name(layer, "k_norm")) if fam.has_qk_norm else None,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
    )


def write_attention(attn: AttentionWeights, config: Mapping[str, Any], layer: int) -> dict[str, torch.Tensor]:
    """Tensors of one layer in the source family's own layout (used for GQA/MQA output).

    Biases that the family's layout has but ``attn`` lacks are written as zeros, so the output
    always matches the config it is saved with.
    """
    fam = family_for(config)
    H, D, hidden = attn.q.shape
    G = attn.num_kv_heads
    out = {
        fam.name(layer, "q_proj"): attn.q.reshape(H * D, hidden),
        fam.name(layer, "k_proj"): attn.k.reshape(G * D, hidden),
        fam.name(layer, "v_proj"): attn.v.reshape(G * attn.v_head_dim, hidden),
        fam.name(layer, "o_proj"): attn.o.reshape(hidden, H * attn.v_head_dim),
    }
    qkv_bias, o_bias = fam.biases(config)
    if qkv_bias:
        z = attn.q.new_zeros
        out[fam.name(layer, "q_proj", "bias")] = (attn.q_bias if attn.q_bias is not None else z(H, D)).reshape(-1)
        out[fam.name(layer, "k_proj", "bias")] = (attn.k_bias if attn.k_bias is not None else z(G, D)).reshape(-1)
        out[fam.name(layer, "v_proj", "bias")] = (
            attn.v_bias if attn.v_bias is not None else z(G, attn.v_head_dim)
        ).reshape(-1)
    if o_bias:
        out[fam.name(layer, "o_proj", "bias")] = attn.o_bias if attn.o_bias is not None else attn.q.new_zeros(hidden)
    if fam.has_qk_norm:
        out[fam.name(layer, "q_norm")] = attn.q_norm
        out[fam.name(layer, "k_norm")] = attn.k_norm
    return {k: v.contiguous() for k, v in out.items()}
