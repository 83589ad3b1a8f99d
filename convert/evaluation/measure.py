"""``convert --measure``: evaluate a freshly written conversion against its source before it is moved
into place, so the model card states measured fidelity, short and long, instead of "not measured".

What is measured (built-in held-out text, never the calibration text; same prompts for both models):
- 512-token-window perplexity, KL and top-1 agreement on 4,096 tokens;
- passkey retrieval at 1K and 2K tokens (5 depths x 2 prompts), where the context allows;
- perplexity per position bucket on one 2K window.

``auto`` measures when it is cheap: on CPU up to ``AUTO_CPU_PARAMS`` parameters (SmolLM2-135M: about
a minute and a half on 2 cores), on CUDA up to ``AUTO_CUDA_PARAMS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .long_context import LongContextOptions, LongContextResult

MODES = ("auto", "on", "off")
AUTO_CPU_PARAMS = 500_000_000
AUTO_CUDA_PARAMS = 8_000_000_000
DATA_NAME = "built-in held-out Python docs"


@dataclass
class Measured:
    fidelity: object  # model_card.FidelityRow
    long_context: list[LongContextResult]
    note: str


def should_measure(mode: str, parameters: int) -> bool:
    if mode not in MODES:
        from ..errors import KvSurgeonError

        raise KvSurgeonError(f"--measure {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "on"
    return parameters <= (AUTO_CUDA_PARAMS if torch.cuda.is_available() else AUTO_CPU_PARAMS)


def long_options(max_positions: int | None) -> LongContextOptions | None:
    ctx = max_positions or 2048
    lengths = tuple(n for n in (1024, 2048) if n <= ctx)
    if not lengths:  # too short a context for the passkey prompt to mean anything: short ppl only
        return None
    return LongContextOptions(tasks=("passkey", "long-ppl"), lengths=lengths, depths=5, samples=2,
                              long_seq_len=min(2048, ctx), long_windows=1)


def measure_conversion(folder: Path, source: Path, max_positions: int | None, progress: bool = True) -> Measured:
    from .perplexity import DEFAULT_EVAL_DATA, evaluate, load_model
    from .long_context import evaluate_long_context
    from ..hub.model_card import FidelityRow

    model, _ = load_model(str(folder))
    ref, _ = load_model(str(source))
    r = evaluate(str(folder), str(DEFAULT_EVAL_DATA), reference=str(source), max_tokens=4096,
                 seq_len=min(512, max_positions or 512), progress=progress, model=model, reference_model=ref)
    row = FidelityRow(stage="after conversion", data=DATA_NAME, tokens=r.tokens, ppl=r.ppl,
                      reference_ppl=r.reference_ppl, kl=r.kl, top1_agreement=r.top1_agreement)
    opts = long_options(max_positions)
    long = []
    if opts is not None:
        with warnings.catch_warnings():  # the card states the resolution; no need to warn here
            warnings.simplefilter("ignore", UserWarning)
            long = evaluate_long_context(str(folder), opts, reference=str(source), progress=progress,
                                         model=model, reference_model=ref)
    note = f"ppl {r.ppl:.2f} vs source {r.reference_ppl:.2f} ({r.ppl / r.reference_ppl:.2f}x), KL {r.kl:.3f}"
    if long:
        src, conv = long
        note += "; passkey " + ", ".join(
            f"{int(n) // 1024}K {conv.passkey_by_length[n]:.0%} (source {src.passkey_by_length[n]:.0%})" for n in conv.passkey_by_length
        )
    return Measured(row, long, note)
