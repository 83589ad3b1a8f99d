"""The uptraining picture (``metrics.png``): the loss and KL (and the codes' CE) by tokens seen, each curriculum stage marked
where it starts, and held-out perplexity beside it when the run measured any."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_figure(rows: list[dict]):
    """A matplotlib figure of ``metrics.jsonl`` rows, or None without a training row. One panel when the
    run logged no held-out evaluation (an empty second panel reads as a failed one). The student's CE
    on the restated codes is drawn where steps logged one (retrieval windows in the batch)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    fig = Figure(figsize=(10 if evals else 6, 4))
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)
    ax = axes[0][0]
    tokens = [r["tokens"] for r in train]
    ax.plot(tokens, [r["loss"] for r in train], label="loss")
    ax.plot(tokens, [r["kl"] for r in train], label="KL(teacher||student)")
    answers = [(r["tokens"], r["answer_ce"]) for r in train if r.get("answer_ce") is not None]
    if answers:
        ax.plot(*zip(*answers), ls="--", lw=1, label="CE on the retrieval codes")
    stages = [(train[i - 1]["tokens"] if i else 0, r.get("stage")) for i, r in enumerate(train)
              if i == 0 or r.get("stage") != train[i - 1].get("stage")]
    if len(stages) > 1:  # a curriculum: each stage starts where the one before ended
        for start, name in stages:
            ax.axvline(start, color="gray", ls=":", lw=1)
            ax.annotate(f" {name}", (start, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="gray")
    ax.set_xlabel("tokens")
    ax.legend(loc="lower left")
    ax.set_title("training")
    if evals:
        ax = axes[0][1]
        ax.plot([r["tokens"] for r in evals], [r["ppl"] for r in evals], "o-", label="student ppl")
        ax.axhline(evals[0]["reference_ppl"], color="gray", ls="--", label="source ppl")
        ax.set_xlabel("tokens")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("held-out perplexity")
    fig.tight_layout()
    return fig


def plot_metrics(metrics_file: Path, png: Path) -> bool:
    """Write ``png`` from ``metrics_file``; False (nothing written) without matplotlib or a training row."""
    try:
        import matplotlib  # noqa: F401  (the plot extra)
    except ImportError:
        return False
    fig = metrics_figure([json.loads(l) for l in Path(metrics_file).read_text().splitlines() if l.strip()])
    if fig is None:
        return False
    fig.savefig(png, dpi=100)
    return True
