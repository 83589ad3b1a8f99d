"""After uptraining: passkey prompts at the last stage's length, scored on the student and the source.

Uptrained MLA -75% runs lost single-key retrieval (to 10-30%, or 0/10 at 4K), at the key's first
digit, with perplexity within 0.06x of runs that kept it (BENCHMARKS.md, "Multikey after uptraining").
The run's ppl eval cannot see that, so the run scores a few prompts itself and says so in its log,
metrics and model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..hybrid.plan import REPORT_FILE
from ..evaluation.long_context import LongContextError, LongContextOptions, LongContextResult, prompt_grid
from .recipe import Recipe, RecipeError

AUTO_PROMPTS = 5  # one per depth, 0% to 100%: 81 s for MLA -75% and its source at 4K on 2 CPU cores
WARN_BELOW = 0.5  # of the source's accuracy: a collapse, not the 10-prompt noise of a close result


def passkey_check_options(recipe: Recipe, tokenizer) -> LongContextOptions | None:
    """The check's prompts, or None when it is off. Built before training, so a last stage too short
    for a passkey prompt is refused (when asked for) before anything is trained."""
    n, auto = recipe.eval_passkey, recipe.eval_passkey is None
    if auto:
        n = AUTO_PROMPTS if recipe.data.retrieval else 0
    if not n:
        return None
    length = recipe.stage_seq_len(recipe.stages[-1])
    try:
        opts = LongContextOptions(tasks=("passkey",), lengths=(length,), depths=n, samples=1, seed=recipe.seed)
        prompt_grid(tokenizer, opts, keys=1)
    except LongContextError as e:
        if auto:
            return None  # short training windows (tests, smoke runs) hold no prompt; nothing was asked for
        raise RecipeError(f"eval_passkey: {e}; the last stage's seq_len ({length}) must hold a passkey prompt: "
                          "lengthen it, or set eval_passkey: 0") from None
    return opts


def retrieved(accuracy: float, reference_accuracy: float, prompts: int, logprob: float, reference_logprob: float,
              aside: str = "") -> str:
    """The student's and the source's passkey counts and key log-probs, as the warning and the console say them;
    ``aside`` goes inside the closing parenthesis."""
    return (f"{round(accuracy * prompts)}/{prompts} retrieved, the source {round(reference_accuracy * prompts)}/{prompts} "
            f"(key log-prob {logprob:.2f} vs {reference_logprob:.2f}{aside})")


def passkey_warning(source: LongContextResult, student: LongContextResult, final: str, reference: str,
                    hint: str | None = None) -> str | None:
    """A warning when the student retrieves less than WARN_BELOW of what the source does; the command it
    names measures ``final`` against ``reference`` finely. ``hint`` (layer_choice_hint) ends it."""
    (length, src), = source.passkey_by_length.items()
    got = student.passkey_by_length[length]
    if got >= WARN_BELOW * src:
        return None
    n = len(student.samples["passkey"])
    counts = retrieved(got, src, n, student.passkey_logprob_by_length[length], source.passkey_logprob_by_length[length])
    return (f"passkey at {length} tokens after uptraining: {counts}. "
            "Perplexity can stay intact while retrieval collapses; measure it with "
            f"`kvsurgeon eval {final} --reference {reference} --tasks passkey --lengths {length}`; "
            "retrain with another seed, or the recipe's retrieval options as shipped "
            "(BENCHMARKS.md, 'Multikey after uptraining': such collapses followed changes to them)"
            + (f". {hint}" if hint else ""))


_CHOSEN = {"auto": "ranked by each layer's KL cost alone on short windows (`--linear-layers auto`)",
           "even": "evenly spaced (`--linear-layers even`)", "list": "listed by hand"}


def layer_choice_hint(student: Path) -> str | None:
    """For a hybrid whose attention layers no search chose, the warning's advice: on SmolLM2 at 75% linear,
    the training that gave the searched set its retrieval gave such a set a fifth of it, so the layer
    choice, not another seed, is the fix. None for other students."""
    try:
        mode = json.loads((Path(student) / REPORT_FILE).read_text()).get("mode")
    except (OSError, ValueError, AttributeError):
        return None  # not a hybrid, or not ours
    if mode not in _CHOSEN:
        return None
    fix = ("unless these came from that search, convert with `--linear-layers search`" if mode == "list"
           else "convert with `--linear-layers search`")
    return (f"This hybrid's attention layers were {_CHOSEN[mode]}, and distillation may not bring back retrieval such "
            "a set lacks: SmolLM2 at 75% linear with `auto`'s layers retrieved 20/0/20% at 1K/2K/4K after "
            "recipes/smollm2-hybrid75-long-4k.yaml's curriculum (50/20/30% with every weight trainable), with the "
            f"layers `--linear-layers search` keeps 100/100/90% (BENCHMARKS.md, 'Code-weighted KL on a 2K-then-4K curriculum'); {fix}")
