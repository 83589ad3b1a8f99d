"""The demo's summary: one row per model, as an 80-column terminal table, Markdown and a PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    name: str  # short, for the terminal
    title: str  # long, for Markdown
    kv_bytes_per_token: int
    ppl_ratio: float  # 512-window perplexity / the source's
    kl: float
    passkey: float  # fraction retrieved
    served: str  # "HF+vLLM": engines that serve it faithfully
    seconds: float  # conversion time
    command: str


def terminal_table(rows: list[Row], title: str):
    """A rich Table whose widest row fits 80 columns."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in ("model", "KV B/tok", "@32K", "ppl x", "passkey", "served", "conv"):
        t.add_column(c, justify="left" if c in ("model", "served") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r.name, f"{r.kv_bytes_per_token:,}", f"{r.kv_bytes_per_token * 32768 / 2**20:,.0f} MiB",
                  f"{r.ppl_ratio:.2f}x", f"{r.passkey:.0%}", r.served, f"{r.seconds:.0f} s" if r.seconds else "-")
    return t


def markdown(rows: list[Row], title: str, args) -> str:
    lines = [f"# kvsurgeon demo\n\n{title}.\n",
             "| model | KV bytes/token | KV at 32K tokens | 512-window ppl vs source | KL(source‖model) | passkey | served by | convert s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.title} | {r.kv_bytes_per_token:,} | {r.kv_bytes_per_token * 32768 / 2**20:,.0f} MiB | "
                     f"{r.ppl_ratio:.2f}x | {r.kl:.3f} | {r.passkey:.0%} | {r.served.replace('HF', 'transformers')} | "
                     f"{r.seconds:.0f} |")
    lines.append("\nCommands (each output folder also holds a model card with them):\n")
    lines += [f"- {r.name}: `{r.command}`" for r in rows if r.command]
    transfer = f"hybrid transfer {args.transfer_tokens:,} tokens per layer" if args.transfer_tokens else "no hybrid attention transfer"
    lines.append(f"\nBudgets: calibration {args.calib_tokens:,} tokens, {transfer}, perplexity on {args.eval_tokens:,} "
                 f"tokens, passkey {5 * args.passkey_samples} prompts at {args.passkey_length:,} tokens. No training: uptraining (recipes/) closes much of the gap.")
    return "\n".join(lines) + "\n"


def png(rows: list[Row], path: Path, title: str) -> None:
    """Three panels sharing the model axis: KV cache per token, perplexity ratio, passkey retrieval.
    The source is the dark bar in each; a model that vLLM does not serve is marked in its name."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    names = [r.name + ("" if "vLLM" in r.served else "\n(transformers only)") for r in rows][::-1]
    rs = rows[::-1]
    colours = ["#333333" if r.name == "source" else "#4C72B0" for r in rs]
    fig = Figure(figsize=(10, 0.7 * len(rows) + 1.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    panels = [
        ([r.kv_bytes_per_token / 1024 for r in rs], "KV cache per token (KiB)\nsmaller is cheaper", "{:.1f}"),
        ([r.ppl_ratio for r in rs], "512-window perplexity / source\nlower is better", "{:.2f}x"),
        ([100 * r.passkey for r in rs], "passkey retrieval (%)\nhigher is better", "{:.0f}%"),
    ]
    for ax, (vals, label, fmt) in zip(axes, panels):
        ax.barh(names, vals, color=colours)
        for y, v in enumerate(vals):
            ax.text(v, y, " " + fmt.format(v), va="center", fontsize=9)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(vals) * 1.3 if max(vals) > 0 else 1)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].axvline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)
