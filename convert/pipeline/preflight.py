"""Preflight: everything about the source is checked before a byte is written.

``convert_model`` runs ``check_source`` (family, tensor names and shapes, legacy buffers), then the
target's plan (which checks its own limits: q bias, q/k norm, rope dims, windows, through the
helpers here), then ``check_coverage`` (every source tensor has a place in the output or is a known
drop). All of it happens before the output folder is created, so a refusal leaves nothing behind.
Problems are collected and raised as one ``PreflightError`` naming each problem and its fix.
"""

from __future__ import annotations

from typing import Iterable

from kvsurgeon.attention import UnsupportedArchitectureError, family_for, head_dim_of, sliding_windows

from ..errors import KvSurgeonError


class PreflightError(KvSurgeonError):
    pass


def refuse(what: str, problems: Iterable[str | None]) -> None:
    """Raise one PreflightError listing every problem (None entries are not problems)."""
    problems = [p for p in problems if p]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"{what}: nothing was written.\n{lines}")


def check_source(config: dict, ckpt) -> None:
    """The source as a checkpoint: a known family, and attention tensors shaped as the config says."""
    try:
        fam = family_for(config)
    except UnsupportedArchitectureError as e:
        raise PreflightError(str(e)) from None
    H = config["num_attention_heads"]
    G = config.get("num_key_value_heads") or H
    D, hidden = head_dim_of(config), config["hidden_size"]
    want = {"q_proj": (H * D, hidden), "k_proj": (G * D, hidden), "v_proj": (G * D, hidden), "o_proj": (hidden, H * D)}
    want["qkv_proj"] = ((H + 2 * G) * D, hidden)  # Phi-3's fused q/k/v
    problems = []
    for i in range(int(config["num_hidden_layers"])):
        for name in fam.attention_tensor_names(i, config):
            if name not in ckpt:
                problems.append(f"{name} is missing: the config ({fam.model_type}) says every layer has it; "
                                "the checkpoint does not match its config.json")
                continue
            proj = name.rsplit(".", 2)[-2]
            shape = _shape(ckpt, name)
            if name.endswith(".weight") and proj in want and shape is not None and tuple(shape) != want[proj]:
                problems.append(f"{name} has shape {tuple(shape)}, the config implies {want[proj]} "
                                f"({H} heads, {G} KV heads, head_dim {D}, hidden {hidden}); fix config.json")
        if len(problems) > 8:
            break
    refuse("the source does not match its config", problems[:8])


def _shape(ckpt, name: str):
    try:
        return ckpt.info(name).shape
    except Exception:  # pickle checkpoints: no header to read; shapes are enforced at write time
        return None


def check_coverage(ckpt, config: dict, rename, attention_names: set[str], planned: set[str], tied: set[str]) -> None:
    """Every source tensor the transform does not rewrite must land on a tensor of the output config,
    be renamed away by the plan, or be a known legacy buffer of the family."""
    fam = family_for(config)
    stray = []
    for name in ckpt.keys():
        if name in attention_names or fam.is_legacy(name):
            continue
        new = rename(name)
        if new is not None and new not in planned and new not in tied:
            stray.append(name)
    if stray:
        shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        refuse(
            "the source has tensors the output model has no place for",
            [f"{shown}. If these are biases, check `attention_bias`/`mlp_bias` in config.json; if they are "
             f"buffers from an older transformers, report them so the {fam.model_type} family's legacy table "
             "(attention/families.py) drops them"],
        )


def window_problem(config: dict, target: str, drop_sliding_window: bool) -> str | None:
    """A problem text when ``target`` cannot keep the source's sliding windows, else None."""
    windows = sliding_windows(config)
    if not windows or drop_sliding_window:
        return None
    sizes = sorted(set(windows.values()))
    return (
        f"the source uses sliding-window attention ({len(windows)} of {config['num_hidden_layers']} layers, "
        f"window {', '.join(map(str, sizes))} tokens), and the {target} output class has no per-layer windows: it "
        "would silently attend to the full context. Pass --drop-sliding-window to convert anyway (the model card "
        "then says the windows were dropped), or use --to gqa/--to mqa, which keep the source class and its windows"
    )


def window_note(config: dict) -> str:
    """Model-card sentence for a conversion that dropped the source's windows (empty if none)."""
    windows = sliding_windows(config)
    if not windows:
        return ""
    sizes = ", ".join(map(str, sorted(set(windows.values()))))
    return (f" Sliding windows dropped (--drop-sliding-window): the source windowed {len(windows)} layers to "
            f"{sizes} tokens; this model attends to the full context in every attention layer.")


def family_problem(config: dict, target: str, method: str | None = None) -> str | None:
    """A problem text when the source family cannot go to ``target`` ("gqa", "mla", "hybrid") by
    ``method``, from the family's declared limits (attention/families.py), else None. An unknown family
    is left to the target's own check, which names it."""
    try:
        fam = family_for(config)
    except UnsupportedArchitectureError:
        return None
    if target in ("mla", "hybrid") and fam.no_mla_hybrid:
        return (f"{fam.no_mla_hybrid}. For {fam.model_type} use --to gqa or --to mqa, which keep the source class with "
                "fewer KV heads")
    if target == "gqa" and method == "calibrated" and fam.no_calibrated:
        return (f"{fam.no_calibrated}. Pass --method mean (mean pooling of the KV heads, no fit) to convert "
                f"{fam.model_type}")
    return None
