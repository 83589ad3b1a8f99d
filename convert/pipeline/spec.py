"""One conversion, described as data (``ConversionSpec``) and run end to end (``run_conversion``).

The CLI's ``convert``, the demo, the benchmarks and the uptraining recipes all go through here, so
a recipe's ``conversion:`` block takes exactly the options ``kvsurgeon convert`` takes.
"""

from __future__ import annotations

import shlex
import typing
from dataclasses import MISSING, InitVar, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvsurgeon.attention.kv_cache import dtype_bytes, kv_bytes_at_context, kv_bytes_per_token
from kvsurgeon.attention.serving import serving_support

from .calibration import CalibConfig
from ..io.checkpoint import LazyCheckpoint, read_config
from ..evaluation.measure import measure_conversion, should_measure
from ..errors import KvSurgeonError
from .driver import ConvertOptions, ConvertResult, convert_model

if TYPE_CHECKING:  # imported where used: the gqa package imports the pipeline
    from ..gqa.merge import MergeOptions

TARGETS = ("gqa", "mqa", "mla", "hybrid", "swa")


def _whole(value, least: int) -> bool:
    """A whole number >= least (a bool is not one, though Python counts it as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _opt(default=MISSING, help: str = "", flag: str | None = None, cli_type=None):
    """A spec field with what the CLI, the recipe schema and the card command derive from it."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli_type": cli_type})


@dataclass
class ConversionSpec:
    """Every option of one conversion, declared once. ``kvsurgeon convert``'s flags (``spec_cli_params``),
    the recipe's ``conversion:`` block (same keys) and the card's reproducing command (``cli_command``)
    are all derived from these fields; ``tests/test_conversion_spec.py`` round-trips them."""

    to: str = _opt(help="gqa | mqa | mla | hybrid | swa")
    kv_heads: int | None = _opt(None, "gqa: KV heads to keep (must divide the query heads)")
    method: str | None = _opt(None, "gqa/mqa: calibrated (default) | mean;  mla: calibrated (default) | svd")
    pooled_rope_planes: int | None = _opt(
        None, "gqa/mqa: how many of the slowest RoPE planes the calibrated merge pools into one basis (default: per "
        "layer, the count with the least mean error on the calibration windows and on them stretched to the source's "
        "max_position_embeddings; 0: RoPE exact). SmolLM2 MQA untrained, ppl at positions 2K-4K / 512-token windows: "
        "default 3.3x / 2.7x the source's (judged on the windows alone, as before: 34.8x / 2.15x), 4 planes 4.4x / "
        "2.8x, 0 4.1x / 4.2x (BENCHMARKS.md)")
    serve_context: int | None = _opt(
        None, "gqa/mqa: the longest context you will serve; the calibrated merge picks each layer's pooled RoPE planes "
        "by their error at these distances (default: the source's max_position_embeddings). Shorter pools more planes: "
        "a better fit inside it, drift beyond it. SmolLM2 MQA untrained, ppl vs the source at 512-token windows / positions "
        "1K-2K / 2K-4K: default (8192) 2.7x / 3.5x / 3.3x, 2048: 2.2x / 3.5x / 7.0x, 512: 2.0x / 6.3x / 41.9x "
        "(BENCHMARKS.md)")
    retrieval_heads: float | None = _opt(
        None, "gqa/mqa/mla: how much more the calibrated fit weighs the query heads that copy from far back: each head "
        "counts 1 + W x its mean attention on bigrams the calibration text repeats 64+ tokens back (default 0: "
        "every head alike; the scores go to kvsurgeon_retrieval_heads.json). SmolLM2 untrained at 130: MQA passkey "
        "20/10/20% at 1K/2K/4K against 10/0/0%, 512-token ppl 2.41x / 3.27x the source's on Python docs / a handbook "
        "against 2.47x / 3.44x; MLA -75% (R48/Dr48, 2K calibration windows) 4K passkey 50% against 20% (fresh prompts: 30% "
        "against 25%), key log-prob 0.7-1.6 nats higher. After uptraining (MQA): no measurable difference (BENCHMARKS.md)")
    kv_lora_rank: int | None = _opt(None, "mla: latent size R (cache = R + rope-dim values/token/layer)")
    rope_dim: int | None = _opt(None, "mla: decoupled rope key dims Dr (even, <= head_dim; default head_dim)")
    pad_latent_to: int | None = _opt(
        None, "mla: zero-pad the cache to this many values/token/layer, exactly (vLLM's MLA kernels take 576)")
    q_bias: str | None = _opt(
        None, "mla: a source q_proj bias (Qwen2) has no place in DeepseekV3: refuse (default) | fit (least squares on "
        "calibration inputs, lossy)")
    qk_norm: str | None = _opt(
        None, "mla: a source's per-head q/k RMSNorm (Qwen3) has no place in DeepseekV3: refuse (default) | fit "
        "(replaced by least-squares linear q/k projections on calibration inputs, lossy)")
    drop_sliding_window: bool = _opt(
        False, "mla/hybrid: the target class has no per-layer windows; convert a windowed source to full attention "
        "(the card says so)")
    keep_attention: float | None = _opt(None, "hybrid: attention layers kept, a count (e.g. 8) or a fraction (e.g. 0.25)")
    linear_layers: list[int] | str | None = _opt(
        None, "hybrid: layers made linear: 'auto' (ranked by each layer's measured KL cost alone), 'search' (every layer's "
        "linear replacement fitted, then whole sets scored on the language modelling and retrieval of 2 windows of 2,048 "
        "calibration tokens; loads the whole model; SmolLM2 at 25%: passkey 100/90/80% at 1K/2K/4K untrained where "
        "auto keeps 0%; 131 forwards, 44 min on 2 cores), "
        "'even', or a list like 0,3,5", cli_type=str)
    linear: str | None = _opt(None, "hybrid: mamba2 (default; Llama/Mistral/Qwen2) | gated-deltanet (Qwen3)")
    transfer_tokens: int = _opt(0, "hybrid: attention-transfer tokens per linear layer (0: init only); a layer whose "
                                   "held-out error training raises keeps its initialisation (SmolLM2: 29 of 30 layers "
                                   "at 8,192 tokens; 98,304 trains: 2.86x -> 2.18x ppl at 75%)")
    window: int | None = _opt(None, "swa: tokens a windowed layer attends to, itself included (e.g. 512)")
    keep_global: float | None = _opt(
        None, "swa: layers kept at full attention, a count (e.g. 8) or a fraction (e.g. 0.25), evenly spaced")
    global_layers: list[int] | str | None = _opt(
        None, "swa: the layers kept at full attention: a list like 0,15,29, or with --keep-global K: 'auto' (the K "
        "layers whose windowing alone costs retrieval most, measured on calibration text with retrieval facts), "
        "'search' (auto's ranking, then an end-to-end search from its top 2K down to K: loads the whole model, "
        "~(2K)^2/2 forwards of 2 x 2,048 tokens; SmolLM2 K=8: ~18 min on 2 cores; passkey at 1K-4K 50/10/10% -> "
        "80/80/70%) or 'even'",
        cli_type=str)
    calib_data: str | None = _opt(None, "calibration text: .jsonl/.txt/.parquet or HF dataset id (default: built-in Python docs). "
                                  "Text of the domain you serve holds it: SmolLM2 MLA -75% on a sysadmin handbook, 3.00x the "
                                  "source's ppl with the default, 2.02x with half handbook pages in 16,384 tokens (BENCHMARKS.md)")
    calib_tokens: int = _opt(8192, "calibration tokens (16384 lowered SmolLM2's MQA and MLA -75% ppl on both text domains measured)")
    calib_seq_len: int = _opt(
        512, "calibration window length; set it to the context you serve (SmolLM2 MLA -50% at 2048: passkey 70 -> 90% "
        "at 2K, 30 -> 70% at 4K; the conversion took 745 s on 2 cores: BENCHMARKS.md)")
    calib_windows_per_text: int | None = _opt(
        None, "take at most this many windows from each calibration text (spreads a small budget over more documents)")
    calib_retrieval: float | None = _opt(
        None, "fraction of calibration windows given long-range retrieval pairs (facts early, restated at the end), so "
        "the fits keep in-context retrieval (default: 0.5 for hybrid and mla, measured to keep or raise passkey "
        "retrieval at 1K-4K; 0 for gqa/mqa, where it trades 512-token ppl for retrieval: BENCHMARKS.md)")
    text_field: str = _opt("text", "text field of calibration rows")
    calib: InitVar[CalibConfig | None] = None  # Python callers may pass a CalibConfig instead of the calib_* fields

    def __post_init__(self, calib: CalibConfig | None = None) -> None:
        if calib is not None:
            self.calib_data, self.calib_tokens, self.calib_seq_len = calib.data, calib.tokens, calib.seq_len
            self.calib_windows_per_text, self.calib_retrieval, self.text_field = calib.windows_per_text, calib.retrieval, calib.text_field
        self.linear_layers = _layer_list(self.linear_layers, "--linear-layers")
        self.global_layers = _layer_list(self.global_layers, "--global-layers")
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
        if self.pooled_rope_planes is not None:
            if self.to not in ("gqa", "mqa") or self.method == "mean":
                raise KvSurgeonError("--pooled-rope-planes tunes the calibrated KV-head merge; it needs --to gqa/mqa "
                                     "without --method mean")
            if not _whole(self.pooled_rope_planes, 0):
                raise KvSurgeonError(f"--pooled-rope-planes must be a whole number >= 0 (0: RoPE exact), got {self.pooled_rope_planes!r}")
        if self.serve_context is not None:
            if self.to not in ("gqa", "mqa") or self.method == "mean":
                raise KvSurgeonError("--serve-context tunes the calibrated KV-head merge; it needs --to gqa/mqa without "
                                     "--method mean")
            if self.pooled_rope_planes is not None:
                raise KvSurgeonError("--serve-context picks the pooled RoPE planes and --pooled-rope-planes fixes them; "
                                     "pass one of the two")
            if not _whole(self.serve_context, 1):
                raise KvSurgeonError(f"--serve-context must be a whole number of tokens >= 1, got {self.serve_context!r}")
        if self.retrieval_heads is not None:
            if self.to not in ("gqa", "mqa", "mla") or self.method not in (None, "calibrated"):
                raise KvSurgeonError("--retrieval-heads weighs the query heads in a calibrated fit; it needs --to gqa/mqa/mla "
                                     f"with the calibrated method{f', not --method {self.method}' if self.method else ''}")
            if isinstance(self.retrieval_heads, bool) or not isinstance(self.retrieval_heads, (int, float)) \
                    or not 0 <= self.retrieval_heads < float("inf"):
                raise KvSurgeonError(f"--retrieval-heads must be a number >= 0 (0: every head alike), got {self.retrieval_heads!r}")
        if self.linear is not None and self.to != "hybrid":
            raise KvSurgeonError("--linear chooses the linear layer type of a hybrid; it needs --to hybrid")
        if self.q_bias is not None and self.to != "mla":
            raise KvSurgeonError("--q-bias decides where an MLA conversion puts the query bias; it needs --to mla")
        if self.qk_norm is not None and self.to != "mla":
            raise KvSurgeonError("--qk-norm decides what an MLA conversion does with a per-head q/k norm; it needs --to mla")
        if self.drop_sliding_window and self.to not in ("mla", "hybrid"):
            raise KvSurgeonError("--drop-sliding-window is for --to mla/hybrid; --to gqa/mqa keeps the source's windows")
        if self.pad_latent_to is not None and self.to != "mla":
            raise KvSurgeonError("--pad-latent-to pads an MLA latent; it needs --to mla")
        self._check_swa()
        if self.to == "mla" and self.kv_lora_rank is None:
            raise KvSurgeonError("--to mla needs --kv-lora-rank R (latent size; the cache keeps R + rope-dim values per token)")

    def _check_swa(self) -> None:
        swa_opts = [f for f in ("window", "keep_global", "global_layers") if getattr(self, f) is not None]
        if self.to != "swa":
            if swa_opts:
                raise KvSurgeonError(f"--{swa_opts[0].replace('_', '-')} is a sliding-window option; it needs --to swa")
            return
        if self.window is None:
            raise KvSurgeonError("--to swa needs --window N (tokens each windowed layer attends to, e.g. 512)")
        if not _whole(self.window, 1):
            raise KvSurgeonError(f"--window must be a whole number of tokens >= 1, got {self.window!r}")
        if isinstance(self.global_layers, str):  # auto / search / even choose --keep-global K layers
            if self.keep_global is None:
                raise KvSurgeonError(f"--global-layers {self.global_layers} chooses --keep-global K layers: pass --keep-global "
                                     "(a count like 8 or a fraction like 0.25)")
        elif (self.keep_global is None) == (self.global_layers is None):
            raise KvSurgeonError("--to swa needs --keep-global K|FRACTION (with --global-layers auto|search|even; even by default) "
                                 "or --global-layers LIST")

    def calib_config(self) -> CalibConfig:
        return CalibConfig(data=self.calib_data, tokens=self.calib_tokens, seq_len=self.calib_seq_len, text_field=self.text_field,
                           windows_per_text=self.calib_windows_per_text, retrieval=self.retrieval_fraction())

    def retrieval_fraction(self) -> float:
        """--calib-retrieval, or the measured default for the target (BENCHMARKS.md, retrieval pairs in
        calibration): hybrid 50% 30% -> 100% passkey at 4K and MLA -50% 60% -> 70% at 2K, at no 512-token
        cost; calibrated MQA gains 1K retrieval (0% -> 60%) but loses 4% of 512-token ppl, so it stays opt-in."""
        if self.calib_retrieval is not None:
            return self.calib_retrieval
        return 0.5 if self.to in ("hybrid", "mla") else 0.0

    def merge_options(self) -> MergeOptions:
        """The calibrated KV-head merge's options that these flags set (the rest keep MergeOptions' defaults)."""
        from ..gqa.merge import MergeOptions

        return MergeOptions(nope_planes=self.pooled_rope_planes, context=self.serve_context)

    def make_plan(self):
        heads = {} if self.retrieval_heads is None else {"retrieval_weight": self.retrieval_heads}  # gqa/mqa/mla only
        if self.to in ("gqa", "mqa"):
            from ..gqa.plan import gqa_plan

            return gqa_plan(self.kv_heads, self.method or "calibrated", merge=self.merge_options(), **heads)
        if self.to == "mla":
            from ..mla.plan import mla_plan

            return mla_plan(self.kv_lora_rank, self.rope_dim, self.method or "calibrated", self.pad_latent_to,
                            q_bias=self.q_bias or "refuse", drop_sliding_window=self.drop_sliding_window,
                            qk_norm=self.qk_norm or "refuse", **heads)
        if self.to == "swa":
            from ..swa.plan import swa_plan

            return swa_plan(self.window, self.keep_global, self.global_layers, calib=self.calib_config())
        from ..hybrid.plan import hybrid_plan

        return hybrid_plan(
            keep_attention=self.keep_attention, linear_layers=self.linear_layers,
            linear=self.linear or "mamba2", transfer_tokens=self.transfer_tokens, calib=self.calib_config(),
            drop_sliding_window=self.drop_sliding_window,
        )


def _layer_list(value, flag: str):
    """A layer option as given on the command line: "auto", "even", "search", or "0,3,5" -> [0, 3, 5]."""
    if not isinstance(value, str) or value in ("auto", "even", "search"):
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise KvSurgeonError(f"{flag} {value!r}: use auto, even, search, or comma-separated layer indices like 0,15,29") from None


def spec_flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def spec_cli_params() -> list[tuple[str, type, Any, str, str]]:
    """(name, CLI type, default, flag, help) per ConversionSpec field: what ``kvsurgeon convert`` exposes."""
    hints = typing.get_type_hints(ConversionSpec)
    out = []
    for f in fields(ConversionSpec):
        tp = f.metadata.get("cli_type") or hints[f.name]
        out.append((f.name, tp, ... if f.default is MISSING else f.default, spec_flag(f), f.metadata["help"]))
    return out


def cli_command(model: str, spec: ConversionSpec, out: str | Path, extra: list[str] | None = None) -> str:
    """The ``kvsurgeon convert`` command that reproduces ``spec`` (for model cards and logs): every
    field that differs from its default, plus the calibration budget whenever calibration runs."""
    args = ["kvsurgeon", "convert", str(model)]
    calibrates = (spec.global_layers in ("auto", "search")) if spec.to == "swa" else (spec.calib_data is not None or spec.method in (None, "calibrated"))
    for f in fields(ConversionSpec):
        value = getattr(spec, f.name)
        if f.name == "kv_heads" and spec.to == "mqa":
            continue  # implied by --to mqa
        shown = f.name == "to" or value != f.default or (calibrates and f.name in ("calib_tokens", "calib_seq_len"))
        if not shown:
            continue
        if isinstance(value, bool):
            args.append(spec_flag(f) if value else "--no-" + spec_flag(f)[2:])
        else:
            args += [spec_flag(f), ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    args += ["--out", str(out), *(extra or [])]
    return shlex.join(args)


def run_conversion(
    model: str,
    spec: ConversionSpec,
    opts: ConvertOptions,
    recipe: str | None = None,
) -> ConvertResult:
    """Convert ``model`` into ``opts.out`` and write a model card describing exactly what was done."""
    opts.calib = spec.calib_config()
    extra = (["--revision", opts.revision] if opts.revision else []) + (["--dtype", opts.dtype] if opts.dtype else [])
    command = cli_command(model, spec, opts.out, extra)

    def card(folder: Path, new_config: dict, src: Path, plan) -> None:
        from ..hub.model_card import CONTEXT_TOKENS, CardInfo, source_license, write_model_card

        fidelity, long_context = [], []
        src_config = read_config(src)
        params = LazyCheckpoint(folder).total_bytes() // dtype_bytes(new_config)
        if should_measure(opts.measure, params):
            from kvsurgeon.attention.kv_cache import text_config

            m = measure_conversion(folder, src, text_config(new_config).get("max_position_embeddings"), progress=opts.progress)
            fidelity, long_context = [m.fidelity], [r.as_dict() for r in m.long_context]
            measured.append(m)

        info = CardInfo(
            base_model=model,
            conversion=spec.to,
            summary=plan.describe(),
            command=command,
            recipe=recipe,
            license=source_license(src),
            kv_bytes_per_token_before=kv_bytes_per_token(src_config),
            kv_bytes_per_token_after=kv_bytes_per_token(new_config),
            kv_bytes_at_context_before=kv_bytes_at_context(src_config, CONTEXT_TOKENS),
            kv_bytes_at_context_after=kv_bytes_at_context(new_config, CONTEXT_TOKENS),
            fidelity=fidelity,
            long_context=long_context,
            serving=[e.describe() for e in serving_support(new_config)],
        )
        write_model_card(folder, info)

    measured: list = []
    res = convert_model(model, spec.make_plan(), opts, card=card)
    res.measured = measured[0] if measured else None
    return res
