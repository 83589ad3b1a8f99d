"""KV-cache accounting from a config: what each layer keeps per token, and what it keeps fixed.

- MHA/GQA/MQA: K and V for every KV head: ``2 * G * head_dim`` values per token.
- MLA (DeepSeek): the compressed latent plus one shared rope key: ``kv_lora_rank + qk_rope_head_dim``.
- Linear layers (Mamba2, Gated DeltaNet): nothing per token, a fixed recurrent + conv state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class LayerCache:
    layer: int
    kind: str  # "mha" | "gqa" | "mqa" | "mla" | "mamba2" | "gated_deltanet"
    values_per_token: int
    fixed_values: int = 0  # conv state, independent of context length, in the model dtype
    fixed_fp32_values: int = 0  # recurrent state: transformers keeps it in float32 whatever the model dtype
    kv_heads: int | None = None
    head_dim: int | None = None
    window: int | None = None  # sliding-window attention caps the tokens kept

    def values_at(self, context: int) -> int:
        """Values held in the model dtype at this context length (the float32 state is separate)."""
        tokens = min(context, self.window) if self.window else context
        return self.values_per_token * tokens + self.fixed_values

    def bytes_at(self, context: int, bytes_per_value: int) -> int:
        return self.values_at(context) * bytes_per_value + self.fixed_fp32_values * 4

    def as_dict(self) -> dict:
        return asdict(self)


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal wrappers (Qwen3.5) keep the decoder's settings under text_config."""
    tc = config.get("text_config")
    return tc if isinstance(tc, Mapping) and "num_hidden_layers" in tc else config


def dtype_name(config: Mapping[str, Any]) -> str:
    c = text_config(config)
    return str(c.get("dtype") or c.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype") or "float32")


def dtype_bytes(config: Mapping[str, Any], dtype: str | None = None) -> int:
    name = (dtype or dtype_name(config)).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _attention_layer(i: int, c: Mapping[str, Any]) -> LayerCache:
    H = c["num_attention_heads"]
    G = c.get("num_key_value_heads") or H
    D = c.get("head_dim") or c["hidden_size"] // H
    kind = "mha" if G == H else ("mqa" if G == 1 else "gqa")
    window = None
    if c.get("sliding_window") and c.get("use_sliding_window", True) is not False:
        lt = c.get("layer_types")
        if lt is None or lt[i] == "sliding_attention":
            window = int(c["sliding_window"])
    return LayerCache(i, kind, 2 * G * D, kv_heads=G, head_dim=D, window=window)


def _mla_layer(i: int, c: Mapping[str, Any]) -> LayerCache:
    return LayerCache(i, "mla", int(c["kv_lora_rank"]) + int(c["qk_rope_head_dim"]), kv_heads=1, head_dim=int(c["kv_lora_rank"]))


def _mamba2_layer(i: int, c: Mapping[str, Any]) -> LayerCache:
    n_heads = c["mamba_n_heads"]
    d_head = c.get("mamba_d_head") or (c.get("mamba_expand", 2) * c["hidden_size"]) // n_heads
    d_state = c["mamba_d_state"]
    n_groups = c.get("mamba_n_groups", 1)
    inner = n_heads * d_head
    ssm = n_heads * d_head * d_state
    conv = (inner + 2 * n_groups * d_state) * c.get("mamba_d_conv", 4)
    return LayerCache(i, "mamba2", 0, fixed_values=conv, fixed_fp32_values=ssm)


def _gdn_layer(i: int, c: Mapping[str, Any]) -> LayerCache:
    nk, nv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    state = nv * dk * dv
    conv = (2 * nk * dk + nv * dv) * c.get("linear_conv_kernel_dim", 4)
    return LayerCache(i, "gated_deltanet", 0, fixed_values=conv, fixed_fp32_values=state)


def layer_caches(config: Mapping[str, Any]) -> list[LayerCache]:
    c = text_config(config)
    mt = c.get("model_type", config.get("model_type"))
    n = c["num_hidden_layers"]
    if mt in ("deepseek_v2", "deepseek_v3"):
        return [_mla_layer(i, c) for i in range(n)]
    if mt == "granitemoehybrid":
        types = c.get("layer_types") or ["attention"] * n
        # transformers >= 5 rewrites the legacy "mamba" layer type to "linear_attention" on load
        return [_mamba2_layer(i, c) if t in ("mamba", "linear_attention") else _attention_layer(i, c) for i, t in enumerate(types)]
    if mt in ("qwen3_next", "qwen3_5", "qwen3_5_text"):
        types = c.get("layer_types") or ["full_attention"] * n
        return [_gdn_layer(i, c) if t == "linear_attention" else _attention_layer(i, c) for i, t in enumerate(types)]
    if "num_attention_heads" in c:
        return [_attention_layer(i, c) for i in range(n)]
    raise ValueError(f"no KV-cache accounting for model_type {mt!r}")


@dataclass(frozen=True)
class CacheSummary:
    dtype: str
    bytes_per_value: int
    values_per_token: int  # summed over layers
    bytes_per_token: int
    fixed_bytes: int  # linear layers' state (conv state in the model dtype, recurrent state in float32)

    def bytes_at(self, context: int, layers: list[LayerCache]) -> int:
        return sum(l.bytes_at(context, self.bytes_per_value) for l in layers)


def summarize(config: Mapping[str, Any], dtype: str | None = None) -> tuple[CacheSummary, list[LayerCache]]:
    layers = layer_caches(config)
    b = dtype_bytes(config, dtype)
    vpt = sum(l.values_per_token for l in layers)
    return (
        CacheSummary(
            dtype=(dtype or dtype_name(config)).replace("torch.", ""),
            bytes_per_value=b,
            values_per_token=vpt,
            bytes_per_token=vpt * b,
            fixed_bytes=sum(l.fixed_values * b + l.fixed_fp32_values * 4 for l in layers),
        ),
        layers,
    )


def kv_bytes_per_token(config: Mapping[str, Any], dtype: str | None = None) -> int:
    return summarize(config, dtype)[0].bytes_per_token


def kv_bytes_at_context(config: Mapping[str, Any], context: int, dtype: str | None = None) -> int:
    """One sequence's cache at ``context`` tokens: windowed layers stop at their window, linear layers
    hold a fixed state."""
    summary, layers = summarize(config, dtype)
    return summary.bytes_at(context, layers) + summary.fixed_bytes
