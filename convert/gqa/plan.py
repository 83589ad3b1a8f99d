"""MHA/GQA -> GQA/MQA: the source's own class with fewer ``num_key_value_heads``."""

from __future__ import annotations

from kvsurgeon.attention import head_dim_of, write_attention

from ..io.checkpoint import LazyCheckpoint
from ..errors import KvSurgeonError
from .merge import MergeOptions, calibrated_merge, check_kv_heads, expand_to_mha, mean_pool
from ..pipeline.driver import Plan
from ..pipeline.preflight import family_problem, refuse

METHODS = ("calibrated", "mean")


def gqa_plan(target: int, method: str = "calibrated", merge: MergeOptions = MergeOptions(), sequential: bool = True):
    """``merge``: ``calibrated_merge``'s options (``MergeOptions``: its measured defaults unless the
    ablations in scripts/experiments/ set them here). ``sequential``: calibrate layer i on the hidden
    states of the converted layers 0..i-1 (GPTQ-style), as the ablation behind BENCHMARKS.md did, so
    the o refit also absorbs upstream drift."""
    if method not in METHODS:
        raise KvSurgeonError(f"unknown --method {method!r} for --to gqa/mqa; choose one of {', '.join(METHODS)}")

    def make_plan(config: dict, ckpt: LazyCheckpoint) -> Plan:
        H = config["num_attention_heads"]
        G = config.get("num_key_value_heads") or H
        expanding = target == H and G < H
        if not expanding:
            check_kv_heads(H, G, target)
        if method == "calibrated" and not expanding and target != G:
            refuse(f"cannot merge KV heads with --method {method}", [family_problem(config, "gqa", method)])
        new_config = {**config, "num_key_value_heads": target, "head_dim": head_dim_of(config)}

        def transform(i, attn, x):
            if expanding:
                new = expand_to_mha(attn)
            elif target == G:
                new = attn
            elif method == "mean":
                new = mean_pool(attn, target)
            else:
                new = calibrated_merge(attn, x, target, merge)
            return write_attention(new, new_config, i)

        what = "expanded (exact repeat)" if expanding else f"{method} merging"
        return Plan(
            new_config=new_config,
            transform=transform,
            needs_calibration=(method == "calibrated" and not expanding and target != G),
            sequential=sequential,
            summary=f"{G} -> {target} KV heads per layer ({H} query heads) by {what}.",
        )

    return make_plan
