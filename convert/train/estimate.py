"""What a GPU recipe costs: a stated FLOPs-per-token model and a stated GPU throughput assumption.

No GPU run has been measured, so a recipe's ``hardware:`` block is an estimate and says so
(``measured: false``). The model, per training token:

* forward of one model = 2 x (matmul parameters: q/k/v/o, MLP, lm_head; the embedding lookup is free)
  + 2 x heads x head_dim x seq_len per softmax layer (QK^T and PV over the causal average context
  seq_len / 2; linear-attention layers' chunked state updates are not counted);
* student = forward + backward (2 x forward) + one more forward under gradient checkpointing; counted
  with the source's shapes (the converted attention differs from it by well under half of the
  attention projections, which are ~20% of an 8B model's matmuls), and only ``keep_attention`` of its
  layers softmax for a hybrid;
* teacher (the frozen source) = one forward.

Time = tokens x FLOPs/token / (GPUs x dense bf16 peak x assumed model-FLOPs utilisation).
"""

from __future__ import annotations

from dataclasses import dataclass

REL_TOL = 0.02  # stated numbers are rounded: within 2% of what they derive from


@dataclass
class HardwareCfg:
    gpus: int = 1
    gpu: str = ""  # e.g. "H100 80GB SXM"
    peak_tflops: float = 0.0  # dense bf16 peak per GPU, from the vendor's datasheet
    mfu: float = 0.0  # assumed model-FLOPs utilisation (fraction of peak the run sustains)
    tokens: int = 0  # the job's tokens: the sum of the stages' budgets
    flops_per_token: float = 0.0  # training_flops_per_token for the source at the recipe's seq_len
    estimated_hours: float = 0.0
    measured: bool = False  # false: estimated from the assumptions above, not measured on a GPU

    def hours(self, tokens: int | None = None, flops_per_token: float | None = None) -> float:
        t = self.tokens if tokens is None else tokens
        f = self.flops_per_token if flops_per_token is None else flops_per_token
        return t * f / (self.gpus * self.peak_tflops * 1e12 * self.mfu) / 3600

    def problems(self, stage_tokens: int) -> list[str]:
        """What the recipe states that does not add up (checked at load time)."""
        errs = []
        if self.gpus < 1 or not self.gpu or self.peak_tflops <= 0 or not 0 < self.mfu <= 1 or self.flops_per_token <= 0:
            errs.append("hardware: gpus >= 1, gpu, peak_tflops > 0, 0 < mfu <= 1 and flops_per_token > 0 are required")
            return errs
        if self.tokens != stage_tokens:
            errs.append(f"hardware.tokens: {self.tokens:,} but the stages sum to {stage_tokens:,}")
        if abs(self.estimated_hours - self.hours()) > REL_TOL * self.hours():
            errs.append(f"hardware.estimated_hours: {self.estimated_hours} but tokens x flops_per_token / "
                        f"(gpus x peak_tflops x mfu) = {self.hours():.2f} h")
        if self.measured:
            errs.append("hardware.measured: true needs a measured run recorded in BENCHMARKS.md; none exists yet")
        return errs


def matmul_params(config: dict) -> int:
    """Parameters that cost a multiply-add per token in a dense Llama/Qwen/Mistral decoder."""
    d, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    H = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or H
    dh = config.get("head_dim") or d // H
    ff = config["intermediate_size"]
    per_layer = 2 * d * H * dh + 2 * d * kv * dh + 3 * d * ff
    return L * per_layer + d * V


def forward_flops_per_token(config: dict, seq_len: int, softmax_fraction: float = 1.0) -> float:
    d, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    dh = config.get("head_dim") or d // H
    softmax_layers = round(L * softmax_fraction)
    return 2 * matmul_params(config) + 2 * softmax_layers * H * dh * seq_len


def training_flops_per_token(config: dict, seq_len: int, softmax_fraction: float = 1.0,
                             gradient_checkpointing: bool = False) -> float:
    """Student forward + backward (+ recompute) and the frozen teacher's forward, per token."""
    student = (4 if gradient_checkpointing else 3) * forward_flops_per_token(config, seq_len, softmax_fraction)
    teacher = forward_flops_per_token(config, seq_len)
    return student + teacher
