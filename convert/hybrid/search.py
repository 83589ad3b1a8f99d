"""``--linear-layers search``: which layers stay attention, chosen end to end on the linearised layers.

The ``auto`` ranking scores each layer linearised alone by short-window KL and cannot see retrieval; the
sliding-window search's layers keep retrieval but lose language modelling (BENCHMARKS.md, "Hybrid 75%"),
and per-layer costs do not compose when most layers are linear. Here every candidate set is run whole:
the source model, with each decoder layer's attention switchable in place to its fitted linear layer
(each linear layer is fitted on the source's own activations, so fitting all of them once serves every
set). A set is scored on retrieval windows (calibration text whose end restates a fact stated far
earlier) by KL(source || model) over the whole window (language modelling) plus KL at its last
``TAIL`` positions (the restated fact: retrieval). The all-attention model is the source exactly
(score 0, the control). Each layer is first scored linear alone; from the ``2 * keep`` layers costliest
alone, the layer whose linearisation costs least is made linear, one at a time, until ``keep`` remain.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..evaluation.perplexity import kl_per_position
from ..greedy import Step, greedy_trials, prune_greedily

TAIL = 32  # scored positions at the end of each retrieval window: the restated fact
BODY_STRIDE = 4  # every 4th position of the window for the language-modelling KL
SEARCH_WINDOWS = 2
SEARCH_SEQ_LEN = 2048


class SwitchableAttention(torch.nn.Module):
    """A decoder layer's attention, or in its place the fitted linear layer (same input: the layer's
    normed hidden states; same role: its output is added to the residual)."""

    def __init__(self, attention: torch.nn.Module, linear: torch.nn.Module):
        super().__init__()
        self.attention, self.linear = attention, linear
        self.use_linear = False

    def forward(self, hidden_states, *args, **kwargs):
        if self.use_linear:  # no cache and no padding here: the windows are scored whole
            return self.linear(hidden_states), None
        return self.attention(hidden_states, *args, **kwargs)


def switchable_model(folder, linear_modules: dict[int, torch.nn.Module]):
    """The source (``folder``, its own class, float32) with layer i's attention switchable to
    ``linear_modules[i]``; all attention until ``set_linear_layers``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    for i, module in linear_modules.items():
        layer = model.model.layers[i]
        layer.self_attn = SwitchableAttention(layer.self_attn, module.to(torch.float32))
    return model.eval()


def set_linear_layers(model, layers: set[int]) -> None:
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.self_attn, SwitchableAttention):
            layer.self_attn.use_linear = i in layers
        elif i in layers:
            raise ValueError(f"layer {i} has no fitted linear layer to switch to")


def scored_positions(seq_len: int, tail: int = TAIL, stride: int = BODY_STRIDE) -> tuple[torch.Tensor, int]:
    """Positions whose next-token distributions are scored: every ``stride``-th of the window, then
    its last ``tail``; and how many of them are the body (the rest are the tail)."""
    body = torch.arange(0, seq_len - tail, stride)
    return torch.cat([body, torch.arange(seq_len - tail, seq_len)]), body.numel()


@torch.inference_mode()
def scored_logprobs(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities at ``positions`` of each window (windows, positions, vocab); the head only
    runs where scored."""
    out = []
    for w in range(ids.shape[0]):
        h = model.model(input_ids=ids[w:w + 1]).last_hidden_state[0, positions]
        out.append(model.lm_head(h).float().log_softmax(-1))
    return torch.stack(out)


def body_tail_means(kl: torch.Tensor, n_body: int) -> tuple[float, float]:
    """Means of a (windows, positions) KL over the first ``n_body`` positions and over the rest (the tail)."""
    return float(kl[:, :n_body].mean()), float(kl[:, n_body:].mean())


def kl_parts(target: torch.Tensor, got: torch.Tensor, n_body: int) -> tuple[float, float]:
    """Mean KL(target || got) per position over the body positions and over the tail positions."""
    return body_tail_means(kl_per_position(target, got), n_body)


def search_linear_layers(model, ids: torch.Tensor, candidates: list[int], keep: int,
                         log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Score each of ``candidates`` linearised alone, then from all of them linear but the ``2 * keep``
    costliest alone, linearise greedily the layer that raises the score least until ``keep`` stay
    attention. Score = body KL + tail KL (nats per scored position). Returns the trace."""
    t0 = time.time()
    say = log or (lambda s: None)
    positions, n_body = scored_positions(ids.shape[1])
    set_linear_layers(model, set())
    target = scored_logprobs(model, ids, positions)

    def score(linear: set[int]) -> dict:
        set_linear_layers(model, linear)
        body, tail = kl_parts(target, scored_logprobs(model, ids, positions), n_body)
        return {"score": body + tail, "kl_body": body, "kl_tail": tail}

    L = len(model.model.layers)
    start = 2 * keep
    bar = tqdm(total=len(candidates) + greedy_trials(min(start, len(candidates)), keep) + 1,
               desc="search attention layers", unit="forward", disable=not progress)
    alone = {}
    for c in candidates:
        alone[c] = score({c})
        bar.update(1)
        say(f"search: layer {c} linear alone: body KL {alone[c]['kl_body']:.4f}, tail KL {alone[c]['kl_tail']:.4f}")
    order = sorted(candidates, key=lambda c: -alone[c]["score"])
    attention = set(order[:start])
    fixed = set(range(L)) - set(candidates)  # never linearised (no fitted layer)
    linear = set(candidates) - attention
    steps = [{"attention": sorted(attention | fixed), **score(linear)}]
    bar.update(1)

    def logged(step: Step[dict]) -> None:
        r = step.result
        steps.append({"linearised": step.dropped, "attention": sorted(step.kept | fixed), **r, "trials": step.trials})
        say(f"search: linearise layer {step.dropped}: score {r['score']:.4f} (body {r['kl_body']:.4f}, "
            f"tail {r['kl_tail']:.4f}), {len(step.kept)} attention layers left ({time.time() - t0:.0f}s)")

    # a candidate dropped from attention is linearised: the cost of keeping ``kept`` is the rest linear
    attention = set(prune_greedily(attention, keep, lambda kept: score(set(candidates) - kept),
                                   value=lambda r: r["score"], on_trial=lambda: bar.update(1), on_step=logged).kept)
    linear = set(candidates) - attention
    bar.close()
    set_linear_layers(model, set())
    return {
        "metric": f"KL(source || model) per position: every {BODY_STRIDE}th position (body) plus the last {TAIL} (tail) of "
                  f"{ids.shape[0]} retrieval windows of {ids.shape[1]} tokens; score = body + tail",
        "alone": [{"layer": c, **alone[c]} for c in order],
        "start_attention": sorted(order[:start]),
        "attention_layers": sorted(attention | fixed),
        "linear_layers": sorted(linear),
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
    }
