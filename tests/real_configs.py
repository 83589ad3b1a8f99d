"""Tiny random models that carry a real checkpoint's config (tests/fixtures/configs/*.json).

The JSON files are the public configs as shipped (transformers 5 field names: ``rope_parameters``,
``dtype``), at full size, so recipe plans can be checked against the real shapes. ``shrink`` keeps
every field and changes only sizes: head_dim 16, hidden = heads x 16 (as the sources have it), the KV-head count capped at 2 with the
query/KV ratio kept, 2 layers (Gemma-3: 6, one full period of its 5 sliding : 1 global pattern), vocab 128,
windows 8 tokens (so 16+ token inputs exercise them; a "window" longer than the context, as Phi-3-128k's,
stays one that never acts), MoE: 4 experts of 32, 2 per token; longrope factor lists cut to the rotary planes.

There is no Hub access where these were written: the files for gemma-2-2b, gemma-3-1b, Phi-3-mini-128k,
OLMo-2-1B, Qwen3-30B-A3B, Mixtral-8x7B and granite-3.1-2b are written from knowledge of their public
config.json, not downloaded. Gemma configs keep the shipped RoPE keys and no ``layer_types`` (transformers
derives both, per layer type, and so does kvsurgeon). Phi-3's ``short_factor``/``long_factor`` have the
shipped length (48) and range but not the shipped values; ``auto_map`` (remote-code pointers) is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
HUB_IDS = json.loads((CONFIGS / "hub_ids.json").read_text())
NAMES = ("Llama-3.1-8B", "Llama-3.2-1B", "Qwen2.5-7B", "Qwen3-8B", "Mistral-7B-v0.3", "Mistral-7B-v0.1",
         "Mixtral-8x7B", "Qwen3-30B-A3B", "gemma-2-2b", "gemma-3-1b", "OLMo-2-1B", "granite-3.1-2b", "Phi-3-mini-128k")
LAYERS = {"gemma-3-1b": 6}
TINY_WINDOW = 8


def attn_impl(config: dict) -> str:
    """sdpa, or eager where transformers' sdpa lacks a feature (Gemma-2's soft cap)."""
    from kvsurgeon.attention import FAMILIES

    fam = FAMILIES.get(config["model_type"])  # outputs of other classes (DeepseekV3, hybrids): sdpa
    return fam.attn_impl if fam else "sdpa"


def real_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def shrink(config: dict, layers: int = 2, **overrides) -> dict:
    c = dict(config)
    H, G = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    g = min(G, 2)
    # hidden = heads x head_dim when the source has it so (GraniteMoeHybrid and vLLM assume it)
    D = c.get("head_dim") or c["hidden_size"] // H
    hidden = g * (H // G) * 16 if D * H == c["hidden_size"] else 64
    c.update(hidden_size=hidden, head_dim=16, num_key_value_heads=g, num_attention_heads=g * (H // G),
             intermediate_size=128, num_hidden_layers=layers, vocab_size=128, bos_token_id=1, eos_token_id=1,
             dtype="float32")
    if c.get("pad_token_id") is not None:  # a token id: must fit the shrunk vocabulary
        c["pad_token_id"] = 0
    if c.get("sliding_window") and c["sliding_window"] <= (c.get("max_position_embeddings") or 0):
        c["sliding_window"] = TINY_WINDOW
    for key, small in (("num_local_experts", 4), ("num_experts", 4), ("num_experts_per_tok", 2), ("moe_intermediate_size", 32)):
        if key in c:
            c[key] = small
    rope = c.get("rope_parameters")
    if isinstance(rope, dict) and "short_factor" in rope:  # one factor per rotary plane
        planes = int(16 * rope.get("partial_rotary_factor", 1.0)) // 2
        c["rope_parameters"] = {**rope, "short_factor": rope["short_factor"][:planes], "long_factor": rope["long_factor"][:planes]}
    if "max_window_layers" in c:
        c["max_window_layers"] = min(c["max_window_layers"], layers)
    c.update(overrides)
    return c


def tiny_from(config: dict, folder: Path, seed: int = 0) -> Path:
    """A random model of ``config`` saved with a tiny tokenizer; weights widened so heads differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import write_tiny_tokenizer

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn_impl(config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1:  # biases and norm weights: not all-zero / all-one, so they matter
                p.copy_(p + 0.05 * torch.randn_like(p)) if p.abs().sum() else p.normal_(0, 0.05)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, cfg.vocab_size)
    return Path(folder)
