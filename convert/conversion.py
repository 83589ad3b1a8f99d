"""One conversion, described as data (``ConversionSpec``) and run end to end (``run_conversion``).

The CLI's ``convert``, the demo, the benchmarks and the uptraining recipes all go through here, so
a recipe's ``conversion:`` block takes exactly the options ``kvsurgeon convert`` takes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kvsurgeon.attention.kv_cache import dtype_bytes, kv_bytes_per_token
from kvsurgeon.attention.serving import serving_support

from .calibration import CalibConfig
from .checkpoint import LazyCheckpoint, read_config
from .measure import measure_conversion, should_measure
from .errors import KvSurgeonError
from .pipeline import ConvertOptions, ConvertResult, convert_model

TARGETS = ("gqa", "mqa", "mla", "hybrid")


@dataclass
class ConversionSpec:
    to: str
    kv_heads: int | None = None  # gqa
    method: str | None = None  # gqa/mqa: calibrated | mean; mla: calibrated | svd
    kv_lora_rank: int | None = None  # mla
    rope_dim: int | None = None  # mla
    pad_latent_to: int | None = None  # mla: cached values per token per layer after exact zero-padding (vLLM: 576)
    keep_attention: float | None = None  # hybrid: attention layers kept (count >= 1, or fraction < 1)
    linear_layers: list[int] | str | None = None  # hybrid: explicit layer list, or "auto"
    linear: str | None = None  # hybrid: mamba2 | gated-deltanet
    transfer_tokens: int = 0  # hybrid: attention-transfer tokens per layer at conversion
    q_bias: str | None = None  # mla: refuse (default) | fit: fold a source q bias into q_proj (DeepseekV3 has none)
    drop_sliding_window: bool = False  # mla/hybrid: convert a windowed source to full attention, said in the card
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        if self.to not in TARGETS:
            raise KvSurgeonError(f"unknown conversion target {self.to!r}; choose one of {', '.join(TARGETS)}")
        if self.to == "mqa":
            if self.kv_heads not in (None, 1):
                raise KvSurgeonError(f"--to mqa means one KV head; got --kv-heads {self.kv_heads} (use --to gqa)")
            self.kv_heads = 1
        if self.to == "gqa" and self.kv_heads is None:
            raise KvSurgeonError("--to gqa needs --kv-heads N (the number of KV heads to keep)")
        if self.to == "hybrid" and self.keep_attention is None and self.linear_layers is None:
            raise KvSurgeonError("--to hybrid needs --keep-attention K|FRACTION or --linear-layers LIST|auto")
        if self.q_bias is not None and self.to != "mla":
            raise KvSurgeonError("--q-bias decides where an MLA conversion puts the query bias; it needs --to mla")
        if self.drop_sliding_window and self.to not in ("mla", "hybrid"):
            raise KvSurgeonError("--drop-sliding-window is for --to mla/hybrid; --to gqa/mqa keeps the source's windows")
        if self.pad_latent_to is not None and self.to != "mla":
            raise KvSurgeonError("--pad-latent-to pads an MLA latent; it needs --to mla")
        if self.to == "mla" and self.kv_lora_rank is None:
            raise KvSurgeonError("--to mla needs --kv-lora-rank R (latent size; the cache keeps R + rope-dim values per token)")

    def make_plan(self):
        if self.to in ("gqa", "mqa"):
            from .to_gqa import gqa_plan

            return gqa_plan(self.kv_heads, self.method or "calibrated")
        if self.to == "mla":
            from .to_mla import mla_plan

            return mla_plan(self.kv_lora_rank, self.rope_dim, self.method or "calibrated", self.pad_latent_to,
                            q_bias=self.q_bias or "refuse", drop_sliding_window=self.drop_sliding_window)
        from .to_hybrid import hybrid_plan

        return hybrid_plan(
            keep_attention=self.keep_attention, linear_layers=self.linear_layers,
            linear=self.linear or "mamba2", transfer_tokens=self.transfer_tokens, calib=self.calib,
            drop_sliding_window=self.drop_sliding_window,
        )


def cli_command(model: str, spec: ConversionSpec, out: str | Path, extra: list[str] | None = None) -> str:
    """The ``kvsurgeon convert`` command that reproduces ``spec`` (for model cards and logs)."""
    args = ["kvsurgeon", "convert", str(model), "--to", spec.to]
    flags = {
        "--kv-heads": spec.kv_heads if spec.to == "gqa" else None,
        "--method": spec.method,
        "--kv-lora-rank": spec.kv_lora_rank,
        "--rope-dim": spec.rope_dim,
        "--pad-latent-to": spec.pad_latent_to,
        "--keep-attention": spec.keep_attention,
        "--linear-layers": ",".join(map(str, spec.linear_layers)) if isinstance(spec.linear_layers, list) else spec.linear_layers,
        "--linear": spec.linear,
        "--transfer-tokens": spec.transfer_tokens or None,
        "--q-bias": spec.q_bias,
        "--calib-data": spec.calib.data,
    }
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    if spec.calib.data or spec.method in (None, "calibrated"):
        args += ["--calib-tokens", str(spec.calib.tokens), "--calib-seq-len", str(spec.calib.seq_len)]
        if spec.calib.windows_per_text:
            args += ["--calib-windows-per-text", str(spec.calib.windows_per_text)]
        if spec.calib.retrieval:
            args += ["--calib-retrieval", str(spec.calib.retrieval)]
        if spec.calib.text_field != "text":
            args += ["--text-field", spec.calib.text_field]
    if spec.drop_sliding_window:
        args += ["--drop-sliding-window"]
    args += ["--out", str(out), *(extra or [])]
    return shlex.join(args)


def run_conversion(
    model: str,
    spec: ConversionSpec,
    opts: ConvertOptions,
    recipe: str | None = None,
) -> ConvertResult:
    """Convert ``model`` into ``opts.out`` and write a model card describing exactly what was done."""
    opts.calib = spec.calib
    command = cli_command(model, spec, opts.out, ["--dtype", opts.dtype] if opts.dtype else None)

    def card(folder: Path, new_config: dict, src: Path, plan) -> None:
        from .model_card import CardInfo, source_license, write_model_card

        fidelity, long_context = [], []
        params = LazyCheckpoint(folder).total_bytes() // dtype_bytes(new_config)
        if should_measure(opts.measure, params):
            from kvsurgeon.attention.kv_cache import text_config

            m = measure_conversion(folder, src, text_config(new_config).get("max_position_embeddings"), progress=opts.progress)
            fidelity, long_context = [m.fidelity], [r.as_dict() for r in m.long_context]
            measured.append(m)

        info = CardInfo(
            base_model=model,
            conversion=spec.to,
            summary=plan.summary,
            command=command,
            recipe=recipe,
            license=source_license(src),
            kv_bytes_per_token_before=kv_bytes_per_token(read_config(src)),
            kv_bytes_per_token_after=kv_bytes_per_token(new_config),
            fidelity=fidelity,
            long_context=long_context,
            serving=[e.describe() for e in serving_support(new_config)],
        )
        write_model_card(folder, info)

    measured: list = []
    res = convert_model(model, spec.make_plan(), opts, card=card)
    res.measured = measured[0] if measured else None
    return res
