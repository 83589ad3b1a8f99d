"""``--global-layers search``: which layers stay global, chosen end to end.

The per-layer ranking (``plan.rank_windowing``) scores each layer windowed alone; with most layers
windowed, what breaks retrieval is how they combine. Here the whole model runs in the output class with
its ``layer_types`` switched between forwards, starting from the ranking's top 2K layers global and
windowing, one at a time, the layer whose loss costs least, until K remain. Score: KL(source || model)
at the last ``TAIL`` positions of retrieval windows (the restated fact), where the all-global model is
the source exactly. Measured with the same search in ``scripts/experiments/swa_greedy.py`` (retrieval
windows from pydocs-train) on SmolLM2, 22 of 30 layers windowed to 512: passkey at 1K/2K/4K 50/10/10% with
the ranking's top 8, 80/80/70% with the searched 8 (source 80%; BENCHMARKS.md).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..evaluation.perplexity import kl_per_position
from ..greedy import Step, greedy_trials, prune_greedily

SEARCH_WINDOWS = 2  # retrieval windows scored per candidate set: ~(2K)^2 forwards of these in all


def switchable_model(folder, windowed_config: dict):
    """The source's weights (``folder``) in the output class of ``windowed_config`` (every layer windowed,
    so classes that decide at init whether to build a sliding mask, like Qwen2, build one), ready for
    ``set_global_layers``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(windowed_config)
    mt = cfg.pop("model_type")
    model = AutoModelForCausalLM.from_pretrained(folder, config=AutoConfig.for_model(mt, **cfg), dtype=torch.float32)
    model.config.layer_types = list(model.config.layer_types)
    return model.eval()


def set_global_layers(model, global_layers: set[int]) -> None:
    """Full attention on ``global_layers``, the window elsewhere, in place: the mask follows
    ``config.layer_types`` per forward; the attention module's ``sliding_window`` feeds flash kernels."""
    for i, layer in enumerate(model.model.layers):
        full = i in global_layers
        model.config.layer_types[i] = "full_attention" if full else "sliding_attention"
        layer.self_attn.sliding_window = None if full else model.config.sliding_window


@torch.inference_mode()
def tail_logprobs(model, ids: torch.Tensor, tail: int) -> torch.Tensor:
    return torch.cat([model(ids[w:w + 1]).logits[0, -tail:].float().log_softmax(-1) for w in range(ids.shape[0])])


def prune_global_layers(model, ids: torch.Tensor, start: list[int], keep: int, tail: int,
                        reference_layers: set[int], log=None) -> dict:
    """Greedy backward search: from ``start`` global, window the layer whose loss raises the tail KL
    least, until ``keep`` remain. ``reference_layers`` global gives the source's function (the target)."""
    t0 = time.time()
    set_global_layers(model, reference_layers)
    target = tail_logprobs(model, ids, tail)

    def kl(layers: frozenset[int]) -> float:
        set_global_layers(model, layers)
        lp = tail_logprobs(model, ids, tail)
        return float(kl_per_position(target, lp).mean())

    steps = [{"layers": sorted(start), "kl": kl(frozenset(start))}]
    bar = tqdm(total=greedy_trials(len(start), keep), desc="search global layers", unit="forward")

    def logged(step: Step[float]) -> None:
        steps.append({"windowed": step.dropped, "layers": sorted(step.kept), "kl": step.result, "trials": step.trials})
        if log:
            log(f"search: window layer {step.dropped}, tail KL {step.result:.4f}, {len(step.kept)} global "
                f"({time.time() - t0:.0f}s)")

    chosen = prune_greedily(set(start), keep, kl, on_trial=lambda: bar.update(1), on_step=logged).kept
    bar.close()
    set_global_layers(model, reference_layers)
    return {"metric": f"KL(source || model) at the last {tail} positions of {ids.shape[0]} retrieval windows of "
                      f"{ids.shape[1]} tokens, greedy backward from the ranking's top {len(start)}",
            "layers": sorted(chosen), "steps": steps, "seconds": round(time.time() - t0, 1)}
