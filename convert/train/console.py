"""One line per measurement a run makes, for its console: the held-out ppl eval and the retrieval check.

metrics.jsonl and the model card keep every number; these lines let a user watching the run see, as it
happens, whether the student is closing its gap to the source without opening a file.
"""

from __future__ import annotations

from pathlib import Path

from .retrieval_check import retrieved


def eval_line(row: dict, data: str | Path | None = None) -> str:
    """A metrics.jsonl ``eval`` row as one sentence: ppl against the source's, KL and top-1 agreement."""
    head = f"eval {row['stage']} (step {row['step']:,}, {row['tokens']:,} tokens trained): ppl {row['ppl']:,.3f}"
    ref = row.get("reference_ppl")
    if ref:
        head += f", the source {ref:,.3f} ({row['ppl'] / ref:.2f}x)"
    if row.get("kl") is not None:
        head += f", KL {row['kl']:.4f}"
    if row.get("top1_agreement") is not None:
        head += f", top-1 agreement {row['top1_agreement']:.1%}"
    return head + f" on {row['eval_tokens']:,} held-out tokens{_of(data)}"


def _of(data: str | Path | None) -> str:
    """A local file by its name (the folder is the user's own); a Hub dataset id whole, since its last part alone
    (``org/ds`` -> ``ds``) names a different dataset."""
    if not data:
        return ""
    return f" of {Path(data).name if Path(data).exists() else data}"


def passkey_line(row: dict) -> str:
    """A metrics.jsonl ``passkey`` row as one sentence: keys retrieved by the student and by the source."""
    counts = retrieved(row["accuracy"], row["reference_accuracy"], row["prompts"], row["logprob"], row["reference_logprob"],
                       aside=f"; {row['seconds']:.0f} s")
    return f"passkey at {row['length']:,} tokens: {counts}"
