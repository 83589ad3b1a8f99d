"""MHA/GQA -> GQA/MQA: the source's own class with fewer ``num_key_value_heads``."""

from __future__ import annotations

from dataclasses import replace

from kvsurgeon.attention import family_for, head_dim_of, rope_spec, write_attention

from ..io.checkpoint import LazyCheckpoint
from ..errors import KvSurgeonError
from .merge import MergeOptions, calibrated_merge, check_kv_heads, expand_to_mha, mean_pool
from ..retrieval_heads import HEADS_FILE, RETRIEVAL_WEIGHT, RetrievalWeighting
from ..pipeline.driver import Plan
from ..pipeline.preflight import family_problem, refuse

METHODS = ("calibrated", "mean")


def gqa_plan(target: int, method: str = "calibrated", merge: MergeOptions = MergeOptions(), sequential: bool = True,
             retrieval_weight: float = RETRIEVAL_WEIGHT):
    """``merge``: ``calibrated_merge``'s options (``MergeOptions``: its measured defaults unless the
    ablations in scripts/experiments/ set them here). ``sequential``: calibrate layer i on the hidden
    states of the converted layers 0..i-1 (GPTQ-style), as the ablation behind BENCHMARKS.md did, so
    the o refit also absorbs upstream drift. ``retrieval_weight``: the calibrated merge counts each query
    head's errors ``1 + retrieval_weight * copy score`` times (``retrieval_heads``), the scores measured on
    the calibration text's far repeats and written beside the model (``HEADS_FILE``)."""
    if method not in METHODS:
        raise KvSurgeonError(f"unknown --method {method!r} for --to gqa/mqa; choose one of {', '.join(METHODS)}")

    def make_plan(config: dict, ckpt: LazyCheckpoint) -> Plan:
        H = config["num_attention_heads"]
        G = config.get("num_key_value_heads") or H
        expanding = target == H and G < H
        if not expanding:
            check_kv_heads(H, G, target)
        if method == "calibrated" and not expanding and target != G:
            refuse(f"cannot merge KV heads with --method {method}",
                   [family_problem(config, "gqa", method), _pooled_planes_problem(config, merge.nope_planes),
                    _serve_context_problem(config, merge)])
        new_config = {**config, "num_key_value_heads": target, "head_dim": head_dim_of(config)}
        # pooled RoPE planes are judged at the distances the model is served at, not the calibration window's
        options = merge if merge.context else replace(merge, context=config.get("max_position_embeddings"))
        weighing = method == "calibrated" and not expanding and target != G and retrieval_weight > 0
        heads = RetrievalWeighting(retrieval_weight) if weighing else None

        def transform(i, attn, x):
            if expanding:
                new = expand_to_mha(attn)
            elif target == G:
                new = attn
            elif method == "mean":
                new = mean_pool(attn, target)
            else:
                new = calibrated_merge(attn, x, target, options, head_weights=heads.head_weights(i, attn, x) if heads else None)
            return write_attention(new, new_config, i)

        what = "expanded (exact repeat)" if expanding else f"{method} merging"
        return Plan(
            new_config=new_config,
            transform=transform,
            needs_calibration=(method == "calibrated" and not expanding and target != G),
            sequential=sequential,
            summary=f"{G} -> {target} KV heads per layer ({H} query heads) by {what}{', query heads ' + heads.summary() if heads else ''}.",
            files={HEADS_FILE: heads.record} if heads else {},
            on_calibration=heads.on_calibration if heads else None,
        )

    return make_plan


def _pooled_planes_problem(config: dict, n: int | None) -> str | None:
    """--pooled-rope-planes N against the source: at most its RoPE planes, and only where keys are merged
    per RoPE plane (a per-head k norm, Qwen3's, merges keys after the norm instead)."""
    if n is None:
        return None
    if family_for(config).has_qk_norm:
        return _no_plane_pooling(config, "--pooled-rope-planes")
    planes = rope_spec(config).rotary_dim // 2
    if n > planes:
        return f"--pooled-rope-planes {n} is more than the {planes} RoPE planes per head of this source; use 0-{planes}"
    return None


def _serve_context_problem(config: dict, merge: MergeOptions) -> str | None:
    """--serve-context against the source: no longer than the context it was trained for, and only where
    the merge pools RoPE planes."""
    if merge.context is None:
        return None
    if family_for(config).has_qk_norm:
        return _no_plane_pooling(config, "--serve-context")
    limit = config.get("max_position_embeddings")
    if limit and merge.context > limit:
        return (f"--serve-context {merge.context} is beyond the source's max_position_embeddings ({limit}); use at most "
                f"{limit}")
    return None


def _no_plane_pooling(config: dict, flag: str) -> str:
    """The refusal for a plane-pooling option on a source whose keys pass a per-head norm (Qwen3's)."""
    return (f"{flag} does not apply to {config.get('model_type')}: its keys pass a per-head norm and are merged "
            "after it, with no plane pooling; drop the option")
