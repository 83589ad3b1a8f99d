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
class Experts:
    """A MoE block's experts as checkpoints store them (one tensor per expert and projection, under
    ``stored``) and as transformers 5 modules hold them (``mlp.experts.gate_up_proj`` (E, 2I, hidden),
    gate rows first, and ``mlp.experts.down_proj`` (E, hidden, I); the router is ``mlp.gate``).
    Conversions copy the stored tensors untouched; only calibration builds the module form."""

    stored: str  # block prefix in the checkpoint, e.g. "block_sparse_moe." (Mixtral) or "mlp."
    gate: str
    up: str
    down: str

    def module_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors (names relative to the layer) in the module's form."""
        out, experts = {}, {}
        for k, t in state.items():
            m = re.fullmatch(re.escape(self.stored) + r"experts\.(\d+)\.(\w+)\.weight", k)
            if m:
                experts.setdefault(int(m[1]), {})[m[2]] = t
            elif k.startswith(self.stored):
                out["mlp." + k[len(self.stored):]] = t
            else:
                out[k] = t
        if experts:
            ids = sorted(experts)
            out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([experts[e][self.gate], experts[e][self.up]]) for e in ids])
            out["mlp.experts.down_proj"] = torch.stack([experts[e][self.down] for e in ids])
        return out


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
    fused_qkv: bool = False  # Phi-3: q, k, v rows stacked in one qkv_proj (split on read, stacked on write)
    qk_norm_scope: str = "head"  # "projection": OLMo-2's q/k norms span every head of the projection
    norm_offset: float = 0.0  # Gemma: every RMSNorm multiplies by (1 + w)
    embed_scale: str | None = None  # Gemma: x sqrt(hidden_size); else a config key (Granite: embedding_multiplier)
    score_scale: str | None = None  # config key giving the score scale: query_pre_attn_scalar (its ** -0.5) or attention_multiplier
    softcap: str | None = None  # config key of the attention-logit soft cap (Gemma-2)
    attn_impl: str = "sdpa"  # the attention calibration runs layers with (sdpa drops Gemma-2's soft cap)
    experts: Experts | None = None  # MoE: experts copied untouched, fused only to run calibration
    # Gemma: configs as shipped give no layer_types / per-type RoPE; transformers' config class derives them
    # (every 2nd, every 6th layer global; rope_local_base_freq for sliding layers), so read them through it
    derived_layers: bool = False
    input_norm: bool = True  # OLMo-2 normalises after attention: its attention reads the residual stream itself
    # Why calibrated merging cannot fit this family (None: it can). Mean pooling never needs a fit.
    no_calibrated: str | None = None
    # Why neither MLA (DeepseekV3) nor a hybrid class can express this family (None: the targets' own checks decide)
    no_mla_hybrid: str | None = None

    def is_legacy(self, name: str) -> bool:
        return any(_template_re(t).fullmatch(name) for t in self.legacy)

    def name(self, layer: int, proj: str, kind: str = "weight") -> str:
        return f"{self.layer_prefix.format(i=layer)}{self.attn}{proj}.{kind}"

    def attention_tensor_names(self, layer: int, config: Mapping[str, Any]) -> list[str]:
        projs = ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
        names = [self.name(layer, p) for p in projs]
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


_GEMMA_NOT_MLA = ("{name} puts an extra RMSNorm after attention and after the MLP (sandwich norms), scales embeddings "
                  "by sqrt(hidden_size), uses (1 + w) norms and a GELU MLP{extra}; neither DeepseekV3 (MLA) nor "
                  "GraniteMoeHybrid/Qwen3.5 (hybrid) has these, so no stock target expresses it")
_MOE_NOT_MLA = ("{name}'s MoE blocks (softmax top-k router) have no exact place in DeepseekV3 (sigmoid-scored router with "
                "shared experts) nor in a hybrid class")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", ("LlamaForCausalLM",)),
        Family("mistral", ("MistralForCausalLM",), windows="all"),
        Family("qwen2", ("Qwen2ForCausalLM",), has_qkv_bias=True, bias_from_config=False, windows="qwen"),
        Family("qwen3", ("Qwen3ForCausalLM",), has_qk_norm=True, windows="qwen"),
        Family("ministral", ("MinistralForCausalLM",), bias_from_config=False, windows="types"),
        # Mixtral's attention is Mistral's with no bias ever; each layer's MoE block is copied untouched
        Family("mixtral", ("MixtralForCausalLM",), bias_from_config=False, windows="all",
               experts=Experts("block_sparse_moe.", "w1", "w3", "w2"),
               no_mla_hybrid=_MOE_NOT_MLA.format(name="Mixtral")),
        # Qwen3-MoE's attention is Qwen3's (per-head q/k norm); transformers windows every layer when sliding_window is set
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), has_qk_norm=True, windows="all",
               experts=Experts("mlp.", "gate_proj", "up_proj", "down_proj"),
               no_mla_hybrid=_MOE_NOT_MLA.format(name="Qwen3-MoE")),
        Family("gemma2", ("Gemma2ForCausalLM",), windows="types", norm_offset=1.0, embed_scale="sqrt_hidden",
               score_scale="query_pre_attn_scalar", softcap="attn_logit_softcapping", attn_impl="eager", derived_layers=True,
               no_mla_hybrid=_GEMMA_NOT_MLA.format(name="Gemma-2", extra=", and soft-caps attention and final logits")),
        Family("gemma3_text", ("Gemma3ForCausalLM",), has_qk_norm=True, windows="types",
               norm_offset=1.0, embed_scale="sqrt_hidden", score_scale="query_pre_attn_scalar", derived_layers=True,
               no_mla_hybrid=_GEMMA_NOT_MLA.format(name="Gemma-3", extra=", q/k norms and a different RoPE per layer type")),
        Family("olmo2", ("Olmo2ForCausalLM",), has_qk_norm=True, qk_norm_scope="projection", input_norm=False,
               no_calibrated=("OLMo-2's q/k norms span the whole projection (every head at once), which calibrated "
                              "merging's per-head key fit cannot keep"),
               no_mla_hybrid=("OLMo-2 normalises after attention and after the MLP (no input norm) and its q/k norms "
                              "span the whole projection; DeepseekV3 and the hybrid classes normalise before them")),
        Family("granite", ("GraniteForCausalLM",), embed_scale="embedding_multiplier", score_scale="attention_multiplier",
               no_mla_hybrid=("Granite scales embeddings, residual branches, attention scores and logits by config "
                              "multipliers; DeepseekV3 has none of them, and the hybrid converter does not take Granite "
                              "sources yet")),
        Family("phi3", ("Phi3ForCausalLM",), bias_from_config=False, fused_qkv=True, windows="all",
               no_mla_hybrid=("Phi-3 stores q/k/v as one fused qkv_proj and the MLP as one fused gate_up_proj; the MLA and "
                              "hybrid converters do not split them yet")),
    )
}


def _template_re(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"\d+"))


def _as_transformers(config: Mapping[str, Any], key: str):
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(**config), key)


def layer_types(config: Mapping[str, Any]) -> list[str] | None:
    """The config's ``layer_types``, derived as transformers derives them where the family does so."""
    types = config.get("layer_types")
    if types or config.get("model_type") not in FAMILIES or not family_for(config).derived_layers:
        return types
    return list(_as_transformers(config, "layer_types"))


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
    types = layer_types(config)
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


def rope_spec(config: Mapping[str, Any], layer: int | None = None) -> RopeSpec:
    """RoPE as the config describes it (transformers 5 `rope_parameters`, or the older flat keys).
    Gemma-3 gives each layer type its own parameters ({"full_attention": {...}, "sliding_attention": {...}}):
    pass ``layer`` to get that layer's."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    fam = FAMILIES.get(config.get("model_type"))
    if fam is not None and fam.derived_layers:  # Gemma-3 as shipped: rope_theta, rope_local_base_freq
        params = dict(_as_transformers(config, "rope_parameters"))
    types = layer_types(config)
    if types and params and all(isinstance(v, Mapping) for v in params.values()):
        if layer is None:
            raise ValueError("this config has a RoPE per layer type: pass the layer")
        params = dict(params[types[layer]])
    theta = params.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    partial = params.pop("partial_rotary_factor", None) or config.get("partial_rotary_factor", 1.0)
    if rope_type == "longrope" and "factor" not in params:
        # Phi-3 states the extension as max / original positions; transformers derives the factor (and from it
        # the cos/sin attention factor) from that ratio. These are the short factors: contexts up to the original
        # length (longer sequences switch to long_factor at run time)
        orig = params.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        params["factor"] = float(config["max_position_embeddings"]) / float(orig)
    hd = head_dim_of(config)
    rotary = int(hd * float(partial))
    return RopeSpec(theta=float(theta), head_dim=hd, rotary_dim=rotary, rope_type=rope_type, scaling=params)


def score_scale(config: Mapping[str, Any]) -> float | None:
    """The attention score scale when the family's is not head_dim ** -0.5."""
    key = family_for(config).score_scale
    if key == "query_pre_attn_scalar":
        return float(config[key]) ** -0.5
    return float(config[key]) if key else None


def embedding_scale(config: Mapping[str, Any]) -> float:
    """What the model multiplies token embeddings by before layer 0."""
    key = family_for(config).embed_scale
    if key == "sqrt_hidden":
        return float(config["hidden_size"]) ** 0.5
    return float(config[key]) if key else 1.0


def read_attention(source: TensorSource, config: Mapping[str, Any], layer: int) -> AttentionWeights:
    """Read one layer's attention into neutral form."""
    fam = family_for(config)
    H = config["num_attention_heads"]
    G = config.get("num_key_value_heads") or H
    D = head_dim_of(config)
    hidden = config["hidden_size"]
    get = source.get_tensor
    qkv_bias, o_bias = fam.biases(config)
    if fam.fused_qkv:  # rows are q (H D), k (G D), v (G D)
        qw, kw, vw = get(fam.name(layer, "qkv_proj")).split([H * D, G * D, G * D])
    else:
        qw, kw, vw = (get(fam.name(layer, p)) for p in ("q_proj", "k_proj", "v_proj"))
    def norm(proj: str, n: int):
        if not fam.has_qk_norm:
            return None
        t = get(fam.name(layer, proj))
        return t if fam.qk_norm_scope == "head" else t.view(n, D)

    cap = config.get(fam.softcap) if fam.softcap else None

    def bias(proj: str, n: int) -> torch.Tensor | None:
        name = fam.name(layer, proj, "bias")
        return get(name).view(n, D) if qkv_bias and name in source else None

    o_name = fam.name(layer, "o_proj", "bias")
    return AttentionWeights(
        q=qw.view(H, D, hidden),
        k=kw.view(G, D, hidden),
        v=vw.view(G, D, hidden),
        o=get(fam.name(layer, "o_proj")).view(hidden, H, D),
        rope=rope_spec(config, layer),
        q_bias=bias("q_proj", H),
        k_bias=bias("k_proj", G),
        v_bias=bias("v_proj", G),
        o_bias=get(o_name) if o_bias and o_name in source else None,
        q_norm=norm("q_norm", H),
        k_norm=norm("k_norm", G),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        norm_offset=fam.norm_offset,
        qk_norm_scope=fam.qk_norm_scope,
        scaling=score_scale(config),
        softcap=float(cap) if cap else None,
    )


def write_attention(attn: AttentionWeights, config: Mapping[str, Any], layer: int) -> dict[str, torch.Tensor]:
    """Tensors of one layer in the source family's own layout (used for GQA/MQA output).

    Biases that the family's layout has but ``attn`` lacks are written as zeros, so the output
    always matches the config it is saved with.
    """
    fam = family_for(config)
    H, D, hidden = attn.q.shape
    G = attn.num_kv_heads
    qkv = (attn.q.reshape(H * D, hidden), attn.k.reshape(G * D, hidden), attn.v.reshape(G * attn.v_head_dim, hidden))
    out = {fam.name(layer, "qkv_proj"): torch.cat(qkv)} if fam.fused_qkv else dict(
        zip((fam.name(layer, p) for p in ("q_proj", "k_proj", "v_proj")), qkv))
    out[fam.name(layer, "o_proj")] = attn.o.reshape(hidden, H * attn.v_head_dim)
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
    if fam.has_qk_norm:  # projection-scope norms are (heads, D) in neutral form
        out[fam.name(layer, "q_norm")] = attn.q_norm.reshape(-1)
        out[fam.name(layer, "k_norm")] = attn.k_norm.reshape(-1)
    return {k: v.contiguous() for k, v in out.items()}
