"""Softmax attention -> sliding-window layers (``--to swa``): training-free, the weights are unchanged,
only the class and the per-layer ``layer_types`` change. A windowed layer's cache stops growing at the
window; the global layers keep the full context.

Output classes (both read ``layer_types`` per layer; chosen by serving them, tests/test_vllm_swa.py):
- Llama / Mistral / Ministral sources -> ``MinistralForCausalLM``: Llama's layer with per-layer
  windows. transformers' Mistral would window every layer (it ignores ``layer_types``) and its Llama
  none. vLLM 0.32 has no native Ministral and serves it through its Transformers backend, which
  passes each sliding layer's window to its attention.
- Qwen2 sources (q/k/v biases, which Ministral cannot hold) -> ``Qwen2ForCausalLM`` with
  ``use_sliding_window``. vLLM's Qwen2 has no per-layer windows: with mixed ``layer_types`` it
  asserts unless ``max_window_layers == num_hidden_layers`` and then serves every layer at full
  attention. ``max_window_layers`` is set below that here, so vLLM refuses instead of serving it wrong.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kvsurgeon.attention import family_for, read_attention, sliding_windows
from kvsurgeon.attention.reference import tail_attention_outputs

from ..pipeline.calibration import CalibConfig, LayerStream, calibration_ids

from ..errors import KvSurgeonError
from ..linalg import relative_mse
from ..hybrid.fit import _keep_count, even_linear_layers
from ..pipeline.driver import Plan
from ..pipeline.preflight import refuse

# source model_type -> output model_type
OUTPUT_CLASS = {"llama": "ministral", "mistral": "ministral", "ministral": "ministral", "qwen2": "qwen2"}
ARCHITECTURES = {"ministral": "MinistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Llama config keys Ministral has no field for: dropped, after checking the source leaves them off
LLAMA_ONLY = ("attention_bias", "mlp_bias", "pretraining_tp")
LLAMA_BIASES = ("attention_bias", "mlp_bias")
SLIDING, FULL = "sliding_attention", "full_attention"


def global_layer_choice(num_layers: int, keep_global: float | int | None, global_layers: Sequence[int] | str | None,
                        ranking: dict | None = None) -> list[int]:
    """The layers kept at full attention: an explicit list, or ``keep_global`` (count or fraction)
    spread evenly (the same spacing as ``--to hybrid``'s kept attention layers), or with
    ``global_layers="auto"`` the ``keep_global`` layers ranked first by ``ranking`` (``rank_windowing``),
    with ``"search"`` the ones ``search.prune_global_layers`` kept (``ranking["search"]``)."""
    if global_layers is not None and not isinstance(global_layers, str):
        layers = list(global_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise KvSurgeonError(f"--global-layers {bad} out of range: this model has layers 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise KvSurgeonError(f"--global-layers lists a layer twice: {layers}")
        if not layers:
            raise KvSurgeonError("--global-layers is empty: keep at least one full-attention layer (e.g. --global-layers 0)")
        return sorted(layers)
    keep = _keep_count(keep_global, num_layers, flag="--keep-global")
    if keep == 0:
        raise KvSurgeonError(
            f"--keep-global {keep_global} keeps no full-attention layer of {num_layers}: with every layer windowed "
            "nothing reaches past the window (retrieval beyond it is lost); keep at least one (--keep-global 1)"
        )
    if global_layers == "auto":
        if ranking is None:
            raise ValueError("global_layers='auto' needs the measured ranking")
        return sorted(r["layer"] for r in ranking["ranking"][:keep])
    if global_layers == "search":
        if ranking is None or "search" not in ranking:
            raise ValueError("global_layers='search' needs the search result")
        return list(ranking["search"]["layers"])
    linear = set(even_linear_layers(num_layers, keep))
    return [i for i in range(num_layers) if i not in linear]


RANKING_FILE = "kvsurgeon_window_ranking.json"
TAIL = 32  # positions scored at the end of each retrieval window: the restated fact and its copy


def retrieval_ids(ckpt, config: dict, window: int, calib: CalibConfig) -> torch.Tensor:
    """Calibration windows (up to 2,048 tokens, 4x the window) that each end by restating a fact stated
    far earlier: what both the ranking and the search score layers on."""
    from ..evaluation.perplexity import load_tokenizer

    ctx = int(config.get("max_position_embeddings") or 2048)
    seq = min(4 * window, ctx, 2048)
    if seq <= window + TAIL:
        raise KvSurgeonError(f"--global-layers auto/search score layers on windows longer than --window {window}; the "
                             f"model's context ({ctx}) leaves no room: pass --global-layers LIST or --global-layers even")
    cfg = CalibConfig(calib.data, max(calib.tokens, 2 * seq), seq, calib.text_field, calib.split, retrieval=1.0)
    return calibration_ids(load_tokenizer(ckpt.folder), cfg)


def search_global_layers(ckpt, config: dict, window: int, keep: int, ranking: dict, ids: torch.Tensor, log=None) -> dict:
    """``--global-layers search``: prune from the ranking's top ``2 * keep`` layers (those the source
    does not window itself) to ``keep``, end to end (``search.prune_global_layers``), on the first
    ``SEARCH_WINDOWS`` of the ranking's retrieval windows ``ids``."""
    from .search import SEARCH_WINDOWS, prune_global_layers, switchable_model

    own = sliding_windows(config)
    free = [r["layer"] for r in ranking["ranking"] if r["layer"] not in own]
    model = switchable_model(ckpt.folder, swa_config(config, window, []))
    return prune_global_layers(model, ids[:SEARCH_WINDOWS], free[: 2 * keep], keep, TAIL, set(free), log=log)


@torch.inference_mode()
def rank_windowing(ckpt, config: dict, window: int, ids: torch.Tensor, log=None) -> dict:
    """Cost of windowing each layer alone, where retrieval happens: on calibration windows ``ids`` whose
    end restates a fact stated far earlier (``retrieval_ids``), the relative
    error of the layer's attention output with a ``window`` vs full attention at the last ``TAIL``
    positions, on the source's own hidden states. Layers that copy from far back (retrieval heads,
    cf. DuoAttention) score high and are the ones to keep global. One streaming pass, one layer in memory."""
    t0 = time.time()
    costs = {}
    for i, x in LayerStream(ckpt, config, ids):
        attn = read_attention(ckpt, config, i)
        full, local = tail_attention_outputs(attn, x, TAIL, (None, window))
        costs[i] = relative_mse(local, full)
        if log:
            log(f"rank: layer {i} windowed alone: tail rel-error {costs[i]:.4f} ({time.time() - t0:.0f}s)")
    order = sorted(costs, key=lambda i: -costs[i])
    seq = ids.shape[1]
    return {
        "metric": f"relative error of the layer's attention output at the last {TAIL} positions of retrieval windows, "
                  f"window {window} vs full attention",
        "tokens": int(ids.numel()), "seq_len": seq, "seconds": round(time.time() - t0, 1),
        "ranking": [{"rank": r, "layer": i, "cost": costs[i]} for r, i in enumerate(order)],
    }


def swa_problems(config: dict, window: int, globals_: list[int]) -> list[str | None]:
    """What stops this source from becoming sliding-window layers in a stock class (empty: nothing)."""
    mt = config.get("model_type")
    if mt not in OUTPUT_CLASS:
        return [f"--to swa converts {', '.join(sorted(OUTPUT_CLASS))} sources (model_type {mt!r} given): its "
                "classes with per-layer windows that vLLM serves are Ministral (Llama layers) and Qwen2"]
    problems: list[str | None] = []
    ctx = int(config.get("max_position_embeddings") or 0)
    if ctx and window >= ctx:
        problems.append(f"--window {window} is not below the context length ({ctx} tokens, max_position_embeddings): "
                        f"it would never drop a token; choose a window < {ctx} (e.g. {max(1, ctx // 8)})")
    if OUTPUT_CLASS[mt] == "ministral":
        for key in LLAMA_BIASES:
            if config.get(key):
                problems.append(f"{key}=true: Ministral (the output class) has no biases there, so this Llama cannot "
                                "be windowed in a stock class vLLM serves per layer")
    src = sliding_windows(config)
    if len(src) == int(config["num_hidden_layers"]):
        problems.append(f"the source already windows every layer ({src[0]} tokens): it has no full-attention layer "
                        "left to keep global; it is already a sliding-window model")
    elif src:
        sizes = sorted(set(src.values()))
        if sizes != [window]:
            problems.append(f"the source already windows {len(src)} layers at {', '.join(map(str, sizes))} tokens and "
                            f"keeps them; the output class has one window size: pass --window {sizes[0]}")
        clash = [i for i in globals_ if i in src]
        if clash:
            problems.append(f"layers {clash} are windowed in the source and stay windowed (their weights never saw "
                            f"more); choose global layers among {[i for i in range(config['num_hidden_layers']) if i not in src]}")
    return problems


def swa_config(config: dict, window: int, globals_: list[int]) -> dict:
    """The output config: the source's, in the output class, with per-layer ``layer_types``."""
    L = int(config["num_hidden_layers"])
    out_type = OUTPUT_CLASS[config["model_type"]]
    types = [FULL if i in set(globals_) else SLIDING for i in range(L)]
    windowed = SLIDING in types
    new = {k: v for k, v in config.items() if not (out_type == "ministral" and k in LLAMA_ONLY)}
    # the window is written even when every layer is global: Ministral builds its sliding mask regardless
    # and raises without one; layer_types alone decide which layers use it
    new.update(model_type=out_type, architectures=[ARCHITECTURES[out_type]], layer_types=types, sliding_window=window)
    if out_type == "qwen2":
        new["use_sliding_window"] = windowed
        # vLLM's Qwen2 asserts on mixed layer_types unless this equals num_hidden_layers, and would then
        # serve every layer at full attention: keep it below, so vLLM refuses rather than serves it wrong
        new["max_window_layers"] = types.index(SLIDING) if windowed else L
    return new


def swa_plan(window: int, keep_global: float | int | None = None, global_layers: Sequence[int] | str | None = None,
             calib: CalibConfig | None = None):
    """A ``make_plan(config, ckpt) -> Plan`` for ``--to swa``: ``window`` tokens per windowed layer (the
    token itself included), full attention on the ``global_layers`` / ``keep_global`` layers
    (``global_layers="auto"``: ranked by ``rank_windowing`` on ``calib`` text; ``"search"``: then pruned end
    to end by ``search_global_layers``, which loads the whole source)."""

    def make_plan(config: dict, ckpt) -> Plan:
        L = int(config["num_hidden_layers"])
        global_layer_choice(L, keep_global, global_layers, {"ranking": [{"layer": i} for i in range(L)], "search": {"layers": []}})  # input checks
        refuse("cannot convert to sliding-window layers", swa_problems(config, window, []))
        files = {}
        ranking = None
        if global_layers in ("auto", "search"):
            ids = retrieval_ids(ckpt, config, window, calib or CalibConfig())
            ranking = rank_windowing(ckpt, config, window, ids, log=tqdm.write)
            if global_layers == "search":
                keep = _keep_count(keep_global, L, flag="--keep-global")
                ranking["search"] = search_global_layers(ckpt, config, window, keep, ranking, ids, log=tqdm.write)
            files[RANKING_FILE] = ranking
        globals_ = global_layer_choice(L, keep_global, global_layers, ranking)
        refuse("cannot convert to sliding-window layers", swa_problems(config, window, globals_))
        new_config = swa_config(config, window, globals_)
        fam = family_for(config)

        def transform(i, attn, x):  # training-free: the layer's own tensors, bit for bit
            return {n: ckpt.get_tensor(n) for n in fam.attention_tensor_names(i, config)}

        windowed = [i for i, t in enumerate(new_config["layer_types"]) if t == SLIDING]
        cls = new_config["architectures"][0]
        summary = (f"{len(windowed)} of {L} layers windowed to {window} tokens, full attention kept in layers "
                   f"{', '.join(map(str, globals_))}; weights unchanged, written as {cls}.")
        if not windowed:
            summary = f"every layer kept at full attention: the source's function, written as {cls}."
        if ranking is not None and "search" in ranking:
            summary += (f" Global layers chosen by an end-to-end search on retrieval windows, from the measured "
                        f"per-layer windowing costs ({RANKING_FILE}).")
        elif ranking is not None:
            summary += f" Global layers chosen by measured windowing cost at retrieval ({RANKING_FILE})."
        return Plan(new_config=new_config, transform=transform, summary=summary, files=files)

    return make_plan
