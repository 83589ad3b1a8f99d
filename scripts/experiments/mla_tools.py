"""MLA helpers that only experiments and tests use, kept out of ``kvsurgeon.convert.mla``.

* ``mla_config`` / ``mla_state_dict``: a DeepseekV3 config and full state dict from converted
  layers held in memory (the CLI writes tensors layer by layer through ``mla_plan`` instead).
* ``mla_spectrum``, ``allocate_ranks``, ``effective_cache``: per-layer latent ranks (an ablation:
  transformers caches ``max(ranks) + Dr`` values per layer, so uneven ranks save nothing stored).
* ``tuning_overrides``: ``FIELD=VALUE`` arguments as ``MlaTuning`` overrides (mla_constants.py, retrieval_heads.py).

Tests import this module with ``scripts/experiments`` on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Mapping, Sequence

import torch

from kvsurgeon.attention.mla_layout import UNTIED_LM_HEAD, MlaWeights, deepseek_config, write_mla
from kvsurgeon.attention.neutral import AttentionWeights, RopeSpec
from kvsurgeon.convert.mla.fit import MlaConversionError, MlaFit, joint_latent_plan
from kvsurgeon.convert.mla.plan import MlaTuning


def mla_spectrum(
    attn: AttentionWeights,
    x: torch.Tensor | None,
    rope_dim: int,
    method: str = "calibrated",
    fit: MlaFit = MlaFit(),
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Descending eigenvalues of the (balanced, whitened) joint [K_nope; V] covariance the latent
    keeps the top R of: the input of ``allocate_ranks``."""
    return joint_latent_plan(attn, x, rope_dim, method, fit, token_weights).evals


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    total_rank: int,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    weights: Sequence[float] | None = None,
) -> list[int]:
    """Per-layer latent ranks summing to ``total_rank``: greedily give the next dim to the layer whose
    next eigenvalue, as a fraction of that layer's total energy (x ``weights[l]``), is largest.

    The config has one ``kv_lora_rank``: layers get ``max(ranks)`` rows with the unused ones zero
    (``convert_layer_to_mla(..., kv_lora_rank=max(ranks), fit=MlaFit(effective_rank=ranks[l]))``), so
    transformers still caches ``max(ranks) + Dr`` values per token per layer; see ``effective_cache``.
    """
    L = len(spectra)
    caps = [len(s) if max_rank is None else min(len(s), max_rank) for s in spectra]
    if min_rank * L > total_rank or sum(caps) < total_rank:
        raise MlaConversionError(f"cannot split a total rank of {total_rank} over {L} layers with ranks in [{min_rank}, caps {caps}]")
    fr = [(s.double().clamp_min(0) / s.double().clamp_min(0).sum().clamp_min(1e-300)) * (1.0 if weights is None else weights[i])
          for i, s in enumerate(spectra)]
    ranks = [min_rank] * L
    heap = [(-float(fr[i][ranks[i]]), i) for i in range(L) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    for _ in range(total_rank - min_rank * L):
        _, i = heapq.heappop(heap)
        ranks[i] += 1
        if ranks[i] < caps[i]:
            heapq.heappush(heap, (-float(fr[i][ranks[i]]), i))
    return ranks


def effective_cache(ranks: Sequence[int], rope_dim: int) -> dict:
    """Cache per token: what transformers stores (every layer holds max(ranks) + Dr) and what the
    ranks actually use."""
    R = max(ranks)
    return {
        "kv_lora_rank": R,
        "stored_values_per_token_per_layer": R + rope_dim,
        "stored_values_per_token": len(ranks) * (R + rope_dim),
        "effective_values_per_token": sum(ranks) + len(ranks) * rope_dim,
        "effective_mean_per_layer": sum(ranks) / len(ranks) + rope_dim,
    }


def mla_config(source_config: Mapping[str, Any], layers: Sequence[MlaWeights], rope: RopeSpec | None = None) -> dict:
    """The DeepseekV3 config for converted layers (dims, rope_theta and bias flag taken from them)."""
    w0 = layers[0]
    dims = (w0.kv_lora_rank, w0.qk_rope_head_dim, w0.qk_nope_head_dim, w0.v_head_dim, w0.rope_interleaved)
    for i, w in enumerate(layers):
        d = (w.kv_lora_rank, w.qk_rope_head_dim, w.qk_nope_head_dim, w.v_head_dim, w.rope_interleaved)
        if d != dims:
            raise MlaConversionError(f"layer {i} has MLA dims {d}, layer 0 has {dims}: one config needs equal dims")
        if w.info.get("rope_theta") != w0.info.get("rope_theta"):
            raise MlaConversionError("layers were converted with different rope frequency plans")
    rope_parameters = None
    if rope is not None and rope.rope_type != "default":
        rope_parameters = {"rope_type": rope.rope_type, "rope_theta": rope.theta, **rope.scaling}
    return deepseek_config(
        source_config, dims[0], dims[1], dims[2], dims[3], w0.info.get("rope_theta"),
        rope_interleave=dims[4], attention_bias=any(w.has_bias for w in layers), rope_parameters=rope_parameters,
    )


def mla_state_dict(
    source: Mapping[str, torch.Tensor], layers: Sequence[MlaWeights], attention_bias: bool | None = None
) -> dict[str, torch.Tensor]:
    """A full DeepseekV3 state dict: every source tensor outside ``.self_attn.`` (embeddings, norms,
    dense MLP, lm_head: DeepseekV3 uses Llama's names) copied, each layer's attention written by
    ``write_mla``."""
    if attention_bias is None:
        attention_bias = any(w.has_bias for w in layers)
    out = {k: v for k, v in source.items() if ".self_attn." not in k and not k.endswith("rotary_emb.inv_freq")}
    for new, name in UNTIED_LM_HEAD.items():  # the config is always untied (vLLM ignores tying)
        out.setdefault(new, source[name])
    for i, w in enumerate(layers):
        out.update(write_mla(w, i, attention_bias))
    return out


def tuning_overrides(pairs: Sequence[str], also: str = "") -> dict:
    """``FIELD=VALUE`` strings as ``MlaTuning`` overrides, each value cast to its field's default's type. An
    unknown field or a value of the wrong type is refused, naming the fields (and ``also``, a caller's own)."""
    fields = {f.name: f.default for f in dataclasses.fields(MlaTuning)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"{pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}{also}")
        try:
            out[name] = _cast(value, fields[name])
        except ValueError as e:
            raise SystemExit(f"{pair!r}: {e}") from None
    return out


def _cast(value: str, default):
    """``value`` as the type of ``default``; ``none`` is None (for the optional fields)."""
    v = value.lower()
    if v == "none":
        return None
    if isinstance(default, bool):  # before int: bool is an int
        if v not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return v in ("true", "1")
    return int(value) if isinstance(default, int) else float(value)
