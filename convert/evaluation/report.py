"""Long-context results as a person reads them: a terminal table, Markdown for model cards, a PNG heatmap."""

from __future__ import annotations

import math
from pathlib import Path

from .long_context import LongContextResult


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _k(n: int | str) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summary_rows(results: list[LongContextResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per model; passkey/multikey accuracy per length, then long ppl per bucket."""
    first = results[0]
    lengths = first.options["lengths"]
    head = ["model"]
    for task in ("passkey", "multikey"):
        if getattr(first, task) is not None:
            head += [f"{task} {_k(n)}" for n in lengths]
    if first.long_ppl is not None:
        head += [f"ppl {b}" for b in first.long_ppl_buckets]
    rows = []
    for r in results:
        row = [r.model]
        for task in ("passkey", "multikey"):
            if getattr(first, task) is not None:
                by = getattr(r, f"{task}_by_length")
                row += [_pct(by.get(str(n))) for n in lengths]
        if first.long_ppl is not None:
            row += [f"{p:.2f}" for p in r.long_ppl]
        rows.append(row)
    return head, rows


def markdown(results: list[LongContextResult]) -> str:
    """A Markdown section: accuracy per length (over all depths), and perplexity per position bucket."""
    head, rows = summary_rows(results)
    o = results[0].options
    n_depths = len(results[0].depths)
    lines = [
        f"Passkey: a 5-digit key in {'built-in filler sentences' if o['filler'] == 'repeat' else o['filler']}, "
        f"{n_depths} depths from 0% to 100%, {o['samples']} prompt{'s' * (o['samples'] != 1)} per length and depth"
        + (f"; multikey hides {o['keys']} keys and asks for one" if "multikey" in o["tasks"] else "")
        + ". Retrieved means greedy decoding emits the key.",
    ]
    if results[0].long_ppl is not None:
        lines.append(
            f"Long perplexity: {o['long_windows']} windows of {o['long_seq_len']:,} tokens "
            f"({results[0].long_ppl_tokens:,} predicted), per position bucket."
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    for extra in extra_lines(results):
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def extra_lines(results: list[LongContextResult]) -> list[str]:
    """The lines under the table, in the terminal and in Markdown: the key's log-probability, paired
    against the first model where the prompts allow it, and the multikey misses onto another door."""
    return [x for x in (key_logprob_line(results), paired_logprob_line(results), other_key_line(results)) if x]


def key_logprob_line(results: list[LongContextResult]) -> str | None:
    """Each model's mean log-probability of the asked key per task and length (nats over the key's tokens):
    a sure retrieval sits near 0, and a near miss lies far above a collapse, which accuracy counts alike."""
    lengths = results[0].options["lengths"]
    parts = []
    for task in ("passkey", "multikey"):
        if getattr(results[0], task) is None or not any(getattr(r, f"{task}_logprob_by_length") for r in results):
            continue  # not measured, or stored before this was recorded
        parts.append(f"{task} {_per_model(results, f'{task}_logprob_by_length', _nats)}")
    if not parts:
        return None
    return (f"Mean log-probability of the key, in nats summed over its tokens ({' / '.join(_k(n) for n in lengths)}; "
            f"0 is certain): " + ". ".join(parts) + ".")


def paired_logprob_line(results: list[LongContextResult]) -> str | None:
    """Each model's key log-probability minus the first model's, prompt by prompt, per task and length:
    mean and standard error of the differences. The prompts are seeded, so two models measured with the
    same options see the same keys; pairing removes the prompts' own difficulty, so a difference of
    more than ~2 standard errors is one these prompts resolve (accuracy over 10-30 prompts rarely does).
    Needs the per-prompt rows (``samples``): results stored without them print nothing."""
    if len(results) < 2:
        return None
    first, lengths = results[0], results[0].options["lengths"]
    parts = []
    for task in ("passkey", "multikey"):
        base = first.samples.get(task)
        if not base:
            continue
        per = [f"{r.model} " + " / ".join(_mean_se([b["answer_logprob"] - a["answer_logprob"]
                                                    for a, b in zip(base, r.samples[task]) if a["length"] == n])
                                          for n in lengths)
               for r in results[1:] if _same_prompts(base, r.samples.get(task))]
        if per:
            parts.append(f"{task} " + "; ".join(per))
    if not parts:
        return None
    return (f"Key log-probability minus {first.model}'s on the same prompts, mean ± standard error of the per-prompt "
            f"difference ({' / '.join(_k(n) for n in lengths)}; nats): " + ". ".join(parts) + ".")


def _same_prompts(a: list[dict], b: list[dict] | None) -> bool:
    """The same prompts in the same order: lengths, depths, and the keys where recorded."""
    return bool(b) and len(a) == len(b) and all(
        (x["length"], x["depth"], x.get("key")) == (y["length"], y["depth"], y.get("key")) for x, y in zip(a, b))


def _mean_se(d: list[float]) -> str:
    if not d:
        return "-"
    m = sum(d) / len(d)
    if len(d) < 2:
        return f"{m:+.2f}"
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    return f"{m:+.2f} ± {se:.2f}"


def _nats(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def other_key_line(results: list[LongContextResult]) -> str | None:
    """Multikey misses that start another door's key, per model and length: retrieval from far back
    kept, the door bound wrong (the rest of the misses say something else)."""
    if results[0].multikey is None:
        return None
    lengths = results[0].options["lengths"]
    per = _per_model(results, "multikey_other_key_by_length", _pct)
    return f"Multikey prompts whose answer turns onto another door's key ({' / '.join(_k(n) for n in lengths)}): {per}."


def _per_model(results: list[LongContextResult], attr: str, fmt) -> str:
    """'model a / b / c; model ...': each model's ``attr`` (a per-length dict) at every length, formatted."""
    lengths = results[0].options["lengths"]
    return "; ".join(f"{r.model} " + " / ".join(fmt(getattr(r, attr).get(str(n))) for n in lengths) for r in results)


def heatmap_png(results: list[LongContextResult], path: str | Path, title: str | None = None) -> Path:
    """Accuracy by length x depth, one panel per model and task, side by side; plus long ppl per bucket."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    first = results[0]
    tasks = [t for t in ("passkey", "multikey") if getattr(first, t) is not None]
    cols = len(results)
    rows = len(tasks) + (1 if first.long_ppl is not None else 0)
    fig = Figure(figsize=(3.2 * cols + 0.8, 2.8 * rows + 0.6), layout="constrained")
    gs = fig.add_gridspec(rows, cols)
    axes = [[fig.add_subplot(gs[ti, ci]) for ci in range(cols)] for ti in range(len(tasks))]
    lengths = first.options["lengths"]
    depths = [f"{100 * d:.0f}%" for d in first.depths]
    image = None
    for ti, task in enumerate(tasks):
        for ci, r in enumerate(results):
            ax = axes[ti][ci]
            grid = getattr(r, task)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    ax.text(j, i, _pct(v), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(depths)), depths, fontsize=7)
            ax.set_yticks(range(len(lengths)), [_k(n) for n in lengths], fontsize=7)
            ax.set_title(f"{r.model}\n{task}", fontsize=8)
            if ci == 0:
                ax.set_ylabel("prompt tokens", fontsize=8)
            if ti == len(tasks) - 1:
                ax.set_xlabel("key depth", fontsize=8)
    if first.long_ppl is not None:
        ax0 = fig.add_subplot(gs[-1, :])  # the whole bottom row: one line per model
        for r in results:
            ax0.plot(range(len(r.long_ppl)), r.long_ppl, marker="o", label=r.model)
        ax0.set_xticks(range(len(first.long_ppl_buckets)), first.long_ppl_buckets, fontsize=7, rotation=30)
        ax0.set_ylabel("ppl", fontsize=8)
        ax0.set_title(f"perplexity by position ({first.options['long_seq_len']} windows)", fontsize=8)
        ax0.legend(fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=[a for row in axes for a in row], shrink=0.8, label="retrieved")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
