"""Attention -> hybrid: chosen attention layers become linear-attention layers.

* Llama / Mistral / Qwen2 -> ``GraniteMoeHybridForCausalLM`` with Mamba2 layers (``--linear mamba2``)
* Qwen3 -> ``Qwen3_5ForCausalLM`` (text) with Gated DeltaNet layers (``--linear gated-deltanet``)

Kept attention layers and every MLP are bit-exact copies (a hybrid with no linear layer reproduces
the source's logits exactly). Which layers: an explicit list, evenly interleaved
(``--keep-attention K|FRACTION``), or ``auto``: each layer is linearised alone on calibration text,
the KL increase of the next-token distribution is measured, and attention stays where it costs most
(ranking printed and saved as ``kvsurgeon_layer_ranking.json`` in the output folder), or ``search``:
every layer's linear replacement is fitted, then sets of them are scored whole, on the language
modelling and the retrieval of long calibration windows (``search.py``; trace saved as
``kvsurgeon_layer_search.json``).

Linear layers are initialised from the attention they replace and calibrated (``convert.hybrid``),
then optionally trained by attention transfer on the calibration inputs (``--transfer-tokens N``).

Layout: ``hybrid_plan`` checks the target (``_checked_target``), picks the layers (``_layer_choice``,
``auto_linear_layers`` with ``rank_layers``), and builds a transform that writes each linear layer
through ``_HybridLayer`` (initialise, optional attention transfer, a shared ``layer_cache``) and the
tensors the target stores in another form (``_non_attention_tensors``). The math is in ``fit.py``.

Pipeline contract used here: ``Plan.rename`` returns ``None`` for source tensors the transform has already written in another
form (the MLP merged into Granite's ``shared_mlp.input_linear``, zero-centred Qwen3.5 norms), and
``Plan.files`` holds JSON files for the output folder.
"""

from __future__ import annotations

from tqdm.auto import tqdm

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from kvsurgeon.attention import UnsupportedArchitectureError, family_for, read_attention
from kvsurgeon.attention.hybrid_layout import (
    GdnWeights,
    HybridLayoutError,
    Mamba2Weights,
    gdn_dims,
    granite_attention_tensors,
    granite_hybrid_config,
    granite_mlp_tensors,
    mamba2_dims,
    qwen35_attention_tensors,
    qwen35_norm_tensor,
    qwen35_text_config,
    write_gdn,
    write_mamba2,
)

from ..pipeline.calibration import CalibConfig, LayerStream, calibration_ids
from ..errors import KvSurgeonError
from kvsurgeon.attention.reference import attention_output
from .fit import (
    GdnInit,
    Mamba2Init,
    attention_transfer,
    gdn_from_attention,
    gdn_module,
    linear_layer_output,
    mamba2_from_attention,
    mamba2_module,
    relative_mse,
    resolve_layer_choice,
)
from ..pipeline.driver import Plan
from ..pipeline.preflight import family_problem, refuse, window_note, window_problem

LINEAR_KINDS = ("mamba2", "gated-deltanet")
RANKING_FILE = "kvsurgeon_layer_ranking.json"
SEARCH_FILE = "kvsurgeon_layer_search.json"
REPORT_FILE = "kvsurgeon_hybrid.json"
GRANITE_SOURCES = ("llama", "mistral", "qwen2")
QWEN35_SOURCES = ("qwen3",)


def _target_for(config: dict, linear: str) -> str:
    try:
        fam = family_for(config)
    except UnsupportedArchitectureError as e:
        raise KvSurgeonError(f"--to hybrid: {e}") from None
    mt = fam.model_type
    if linear not in LINEAR_KINDS:
        raise KvSurgeonError(f"unknown --linear {linear!r}; choose one of {', '.join(LINEAR_KINDS)}")
    if linear == "mamba2":
        if mt in GRANITE_SOURCES:
            return "granite"
        raise KvSurgeonError(
            f"--linear mamba2 writes GraniteMoeHybrid, whose attention has no q/k norms, so a {mt} source would not map "
            f"exactly; use --linear gated-deltanet (Qwen3.5) for Qwen3 sources"
        )
    if mt in QWEN35_SOURCES:
        return "qwen35"
    raise KvSurgeonError(
        f"--linear gated-deltanet writes Qwen3.5, whose attention always applies zero-centred q/k norms and an output "
        f"gate: a {mt} source has no q/k norms, so its attention layers would not be kept exactly. Use --linear mamba2 "
        f"(GraniteMoeHybrid) for {mt} sources"
    )


def hybrid_plan(
    keep_attention: float | int | None = None,
    linear_layers: Sequence[int] | str | None = None,
    linear: str = "mamba2",
    transfer_tokens: int = 0,
    *,
    calib: CalibConfig | None = None,
    rank_tokens: int = 2048,
    rank_kl_stride: int = 4,
    transfer_lr: float = 3e-4,
    transfer_batch_windows: int = 2,
    mamba_init: Mamba2Init | None = None,
    gdn_init: GdnInit | None = None,
    ranking: dict | None = None,
    layer_cache: dict | None = None,
    log: Callable[[str], None] | None = tqdm.write,  # above the per-layer progress bar, not into it
    drop_sliding_window: bool = False,
):
    """A ``make_plan(config, ckpt) -> Plan`` for ``--to hybrid``.

    keep_attention: attention layers kept: an int count, a float < 1 fraction of the layers, or a whole
        float count. linear_layers: explicit indices (list or "0,3,5"), "auto" (ranked on calibration
        text; keeps ``keep_attention``, default half) or "even"/None (evenly interleaved).
    linear: "mamba2" (Llama/Mistral/Qwen2 -> GraniteMoeHybrid) or "gated-deltanet" (Qwen3 -> Qwen3.5).
    transfer_tokens: attention-transfer tokens per linear layer (optimizer tokens: calibration windows
        are reused, ``ceil(N / (batch_windows * seq_len))`` steps); 0 = initialisation only.
    calib: the calibration text (must match the pipeline's ``ConvertOptions.calib``; used here for the
        ``auto`` ranking pass, which needs all layers before the pipeline starts). rank_tokens: tokens
        of it used for the ranking.
    ranking: a ranking from an earlier ``auto`` run on the same source and calibration (the content of
        ``kvsurgeon_layer_ranking.json``): reused instead of measured again.
    layer_cache: a dict shared by several plans for the *same source, calibration and settings*: each
        linear layer's initialised / trained weights are computed once and reused (a linear layer
        only sees the source's own activations, so it does not depend on which other layers are
        linear). Benchmarks comparing layer choices use it.
    """
    if isinstance(transfer_tokens, bool) or not isinstance(transfer_tokens, int) or transfer_tokens < 0:
        raise KvSurgeonError(f"--transfer-tokens must be a whole number >= 0, got {transfer_tokens!r}")
    if linear not in LINEAR_KINDS:
        raise KvSurgeonError(f"unknown --linear {linear!r}; choose one of {', '.join(LINEAR_KINDS)}")
    say = log or (lambda s: None)
    fit = _LinearFit(transfer_tokens=transfer_tokens, transfer_lr=transfer_lr, transfer_batch_windows=transfer_batch_windows,
                     mamba_init=mamba_init, gdn_init=gdn_init, layer_cache=layer_cache, say=say)

    def make_plan(config: dict, ckpt) -> Plan:
        target = _checked_target(config, linear, drop_sliding_window)
        L = int(config["num_hidden_layers"])
        mode, keep, layers = _layer_choice(L, keep_attention, linear_layers)
        build_config = _layout_checked(config, target)
        files: dict[str, object] = {}
        if mode == "search":
            layers, files[SEARCH_FILE] = _searched_linear_layers(ckpt, config, target, keep, calib or CalibConfig(), fit, say,
                                                               progress=log is not None)
        elif mode == "auto":
            layers, files[RANKING_FILE] = auto_linear_layers(
                config, keep, ranking, say,
                lambda: rank_layers(ckpt, config, target, calib or CalibConfig(), rank_tokens, kl_stride=rank_kl_stride,
                                    mamba_init=mamba_init, gdn_init=gdn_init, log=say),
            )
        try:
            new_config = build_config(config, layers)
        except HybridLayoutError as e:
            raise KvSurgeonError(str(e)) from None
        report = {"linear_layers": layers, "mode": mode, "target": new_config["architectures"][0], "layers": {}}
        files[REPORT_FILE] = report
        layer = _HybridLayer(fit, target, new_config, float(config.get("rms_norm_eps", 1e-6)), report)
        linear_set = set(layers)

        def transform(i, attn, x):
            if i in linear_set:
                if x is None:
                    raise KvSurgeonError("internal error: linear layers need calibration inputs")
                out = layer.linearise(i, attn, x)
            elif target == "granite":
                out = granite_attention_tensors(attn, i, bool(new_config["attention_bias"]))
            else:
                out = qwen35_attention_tensors(attn, i)
            out.update(_non_attention_tensors(ckpt, target, i, L))
            return out

        def summary() -> str:  # read when the card is written: it states what each layer's transfer did
            return _hybrid_summary(config, new_config, target, mode, layers, transfer_tokens, drop_sliding_window, report)

        return Plan(new_config=new_config, transform=transform, needs_calibration=bool(layers),
                    rename=_rename_for(target), summary=summary, files=files)

    return make_plan


def _checked_target(config: dict, linear: str, drop_sliding_window: bool) -> str:
    """The target ("granite" or "qwen35"), after the family and window refusals."""
    refuse("cannot convert to a hybrid", [family_problem(config, "hybrid")])
    target = _target_for(config, linear)
    # before the ranking pass: a refusal must come before any work
    refuse("cannot convert to a hybrid", [window_problem(
        config, "GraniteMoeHybrid" if target == "granite" else "Qwen3.5", drop_sliding_window)])
    return target


def _layout_checked(config: dict, target: str):
    """The target's config builder, once its layout checks (head_dim, activation, ...) pass on the
    source, before any expensive pass."""
    build_config = granite_hybrid_config if target == "granite" else qwen35_text_config
    try:
        build_config(config, [])
    except HybridLayoutError as e:
        raise KvSurgeonError(str(e)) from None
    return build_config


def _layer_choice(L: int, keep_attention, linear_layers):
    """``resolve_layer_choice``, refusing a hybrid with no attention layer left."""
    mode, keep, layers = resolve_layer_choice(L, keep_attention, linear_layers)
    if (keep == 0 if mode in ("auto", "search") else len(layers) == L):
        raise KvSurgeonError(
            f"--to hybrid needs at least one attention layer: with every layer linear, transformers' hybrid cache "
            f"has no attention layer to count tokens (DynamicCache.get_seq_length raises) and generate() fails; "
            f"keep at least one (--keep-attention 1)"
        )
    return mode, keep, layers


def auto_linear_layers(config: dict, keep: int, given_ranking: dict | None, say,
                       measure: Callable[[], dict]) -> tuple[list[int], dict]:
    """Linear layers for ``auto``: all but the ``keep`` layers most costly to linearise, from the
    given ranking or a measured one; returns them and the ranking file's content."""
    ranking = dict(given_ranking) if given_ranking else measure()
    order = [r["layer"] for r in ranking["ranking"]]  # most costly to linearise first
    kept = set(order[:keep])
    layers = sorted(i for i in range(int(config["num_hidden_layers"])) if i not in kept)
    ranking["kept_attention"] = sorted(kept)
    ranking["linear_layers"] = layers
    say(format_ranking(ranking))
    return layers, ranking


def _searched_linear_layers(ckpt, config: dict, target: str, keep: int, calib: CalibConfig, fit: "_LinearFit",
                            say, progress: bool) -> tuple[list[int], dict]:
    """Linear layers for ``search``: every layer's linear replacement is fitted once on the calibration
    inputs (into the fit's layer cache, so the pipeline writes the same weights), then
    ``search.search_linear_layers`` chooses end to end; returns the linear layers and the trace."""
    from ..evaluation.perplexity import load_tokenizer
    from .search import SEARCH_SEQ_LEN, SEARCH_WINDOWS, search_linear_layers, switchable_model

    L = int(config["num_hidden_layers"])
    all_linear = (granite_hybrid_config if target == "granite" else qwen35_text_config)(config, list(range(L)))
    if fit.layer_cache is None:
        fit.layer_cache = {}
    fitter = _HybridLayer(fit, target, all_linear, float(config.get("rms_norm_eps", 1e-6)), {"layers": {}})
    tok = load_tokenizer(ckpt.folder)
    modules = {}
    for i, x in LayerStream(ckpt, config, calibration_ids(tok, calib)):
        attn = read_attention(ckpt, config, i).to(torch.float32)
        key = (i, fit.transfer_tokens)
        if key not in fit.layer_cache:
            fit.layer_cache[key] = fitter.fitted_state(i, attn, x)
        modules[i] = _linear_module(target, all_linear, i, fit.layer_cache[key][0])
    seq = min(SEARCH_SEQ_LEN, int(config.get("max_position_embeddings") or SEARCH_SEQ_LEN))
    ids = calibration_ids(tok, CalibConfig(calib.data, SEARCH_WINDOWS * seq, seq, calib.text_field, calib.split, retrieval=1.0))
    trace = search_linear_layers(switchable_model(ckpt.folder, modules), ids[:SEARCH_WINDOWS], list(range(L)), keep, log=say,
                                 progress=progress)
    say(f"search: attention kept on layers {trace['attention_layers']}; linear: {trace['linear_layers']}")
    return trace["linear_layers"], trace


def _linear_module(target: str, config: dict, i: int, state: dict) -> torch.nn.Module:
    module = mamba2_module(config, i) if target == "granite" else gdn_module(config, i)
    module.load_state_dict(state, strict=True)
    return module


@dataclass
class _LinearFit:
    """How linear layers are fitted: initialisation, optional attention transfer, a shared cache."""

    transfer_tokens: int
    transfer_lr: float
    transfer_batch_windows: int
    mamba_init: Mamba2Init | None
    gdn_init: GdnInit | None
    layer_cache: dict | None
    say: Callable[[str], None]


@dataclass
class _HybridLayer:
    """One plan's linear layers: fitted (or taken from the cache), reported, written."""

    fit: _LinearFit
    target: str  # "granite" or "qwen35"
    new_config: dict
    eps: float
    report: dict

    def linearise(self, i: int, attn, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's linear-layer tensors, from the cache when the same layer was fitted before."""
        cache, key = self.fit.layer_cache, (i, self.fit.transfer_tokens)
        if cache is not None and key in cache:
            sd, info = cache[key]
            self.fit.say(f"layer {i}: reused from layer_cache")
        else:
            sd, info = self.fitted_state(i, attn, x)
            if cache is not None:
                cache[key] = (sd, info)
        self.report["layers"][str(i)] = info
        if self.target == "granite":
            return write_mamba2(Mamba2Weights.from_state_dict(sd), self.new_config, i)
        return write_gdn(GdnWeights.from_state_dict(sd), self.new_config, i)

    def initialised(self, i: int, attn, x: torch.Tensor, y: torch.Tensor, t0: float):
        """The linear layer's weights initialised from the attention, and what the fit measured
        (``init_seconds``: since t0)."""
        cache, key = self.fit.layer_cache, (i, "init")
        if cache is not None and key in cache:
            w, info = cache[key]
            return w, dict(info)
        if self.target == "granite":
            w, info = mamba2_from_attention(attn, x, mamba2_dims(self.new_config), eps=self.eps, init=self.fit.mamba_init, target=y)
        else:
            w, info = gdn_from_attention(attn, x, gdn_dims(self.new_config), eps=self.eps, init=self.fit.gdn_init, target=y)
        info["init_seconds"] = round(time.time() - t0, 2)
        if cache is not None:
            cache[key] = (w, dict(info))
        return w, info

    def fitted_state(self, i: int, attn, x: torch.Tensor):
        """The linear layer's float32 state dict: initialised, then trained by attention transfer
        on x if asked; and its report entry."""
        t0 = time.time()
        y = attention_output(attn, x).to(torch.float32)
        w, info = self.initialised(i, attn, x, y, t0)
        module = mamba2_module(self.new_config, i, w) if self.target == "granite" else gdn_module(self.new_config, i, w)
        f = self.fit
        if f.transfer_tokens:
            T = x.shape[1]
            steps = max(1, math.ceil(f.transfer_tokens / (f.transfer_batch_windows * T)))
            res = attention_transfer(module, x, y, steps, f.transfer_lr, batch_windows=f.transfer_batch_windows)
            info["transfer"] = {k: v for k, v in res.as_dict().items() if k != "history"}
            outcome = (f"{res.val_rel_mse_trained:.4f}, worse: initial weights kept" if res.restored
                       else f"{res.val_rel_mse_after:.4f}")
            f.say(
                f"layer {i}: init rel-MSE {info['rel_mse_init']:.4f}, attention transfer {res.steps} steps: held-out "
                f"{res.val_rel_mse_before:.4f} -> {outcome} ({res.seconds:.0f}s)"
            )
        else:
            f.say(f"layer {i}: init rel-MSE {info['rel_mse_init']:.4f} ({info['init_seconds']:.0f}s)")
        sd = {k: v.detach().to(torch.float32).clone() for k, v in module.state_dict().items()}
        return sd, info


def _non_attention_tensors(ckpt, target: str, i: int, L: int) -> dict[str, torch.Tensor]:
    """Layer i's tensors the target stores in another form: Granite's merged MLP, Qwen3.5's
    zero-centred norms (the final norm with the last layer)."""
    p = f"model.layers.{i}."
    out = {}
    if target == "granite":
        g = [ckpt.get_tensor(p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")]
        out.update(granite_mlp_tensors(*g, i))
    else:
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = qwen35_norm_tensor(ckpt.get_tensor(p + n + ".weight"))
        if i == L - 1:
            out["model.norm.weight"] = qwen35_norm_tensor(ckpt.get_tensor("model.norm.weight"))
    return out


def _rename_for(target: str):
    """The plan's rename: drop the source tensors ``_non_attention_tensors`` already wrote."""
    if target == "granite":
        def rename(name: str):
            return None if ".mlp." in name else name
    else:
        def rename(name: str):
            if name == "model.norm.weight" or name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                return None
            return name
    return rename


def _hybrid_summary(config: dict, new_config: dict, target: str, mode: str, layers: list[int], transfer_tokens: int,
                    drop_sliding_window: bool, report: dict) -> str:
    L = int(config["num_hidden_layers"])
    kind = "Mamba2" if target == "granite" else "Gated DeltaNet"
    how = {"auto": "chosen by measured KL cost (auto)", "even": "evenly interleaved", "list": "as listed",
           "search": "chosen by an end-to-end search scoring whole sets on the language modelling and retrieval of long "
                     "calibration windows (search)"}[mode]
    return (
        f"{len(layers)} of {L} attention layers replaced by {kind} layers ({how}: {layers}); "
        f"{L - len(layers)} attention layers and all MLPs kept exactly, as {new_config['architectures'][0]}. "
        f"Linear layers initialised from the attention they replace (V->x, K->B, Q->C, O->out_proj) and calibrated"
        + (_transfer_summary(transfer_tokens, report) if transfer_tokens else ".")
        + (window_note(config) if drop_sliding_window else "")
    )


def _transfer_summary(transfer_tokens: int, report: dict) -> str:
    """What the attention transfer did: a transfer that raised a layer's held-out error was undone, and
    the card must not claim it for that layer."""
    done = [info["transfer"] for info in report["layers"].values() if "transfer" in info]
    text = f", then attention transfer on {transfer_tokens} tokens per layer"
    undone = sum(t["restored"] for t in done)
    if not undone:
        return text + "."
    if undone == len(done):
        return text + (": on every layer it raised the error on held-out calibration windows, so every layer kept its "
                       "initialisation (more tokens, e.g. --transfer-tokens 98304, train further).")
    return text + (f", kept on {len(done) - undone} of {len(done)} layers; on the other {undone} it raised the error on "
                   f"held-out calibration windows, so they kept their initialisation.")


# ----------------------------------------------------------------------------------------------
# auto: measured cost of linearising each layer alone
# ----------------------------------------------------------------------------------------------


def _final_projection(ckpt, config: dict):
    norm_w = ckpt.get_tensor("model.norm.weight").to(torch.float32)
    head = ckpt.get_tensor("lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight").to(torch.float32)
    eps = float(config.get("rms_norm_eps", 1e-6))

    def logits(h: torch.Tensor) -> torch.Tensor:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_w
        return h @ head.T

    return logits


@torch.inference_mode()
def rank_layers(
    ckpt,
    config: dict,
    target: str,
    calib: CalibConfig,
    tokens: int = 2048,
    *,
    kl_stride: int = 4,
    mamba_init: Mamba2Init | None = None,
    gdn_init: GdnInit | None = None,
    log: Callable[[str], None] | None = None,
    seq_len: int | None = None,
    tail: int = 0,
) -> dict:
    """Cost of linearising each layer alone: KL(source || model with only layer i linearised) per
    token on ``tokens`` calibration tokens (every ``kl_stride``-th position), plus the layer's own
    relative output error. One streaming pass: the clean hidden states and one perturbed copy per
    layer already visited advance through each source layer in turn (L (L + 1) / 2 layer forwards,
    one layer in memory).

    seq_len: window length (default ``calib.seq_len``). tail > 0 gives every window retrieval facts and
    adds the mean KL at its last ``tail`` positions (the restated fact) to the score, as ``search``
    scores; the ``auto`` mode uses neither (scripts/experiments/hybrid_rank_retrieval.py does)."""
    from ..evaluation.perplexity import kl_per_position, load_tokenizer

    t0 = time.time()
    say = log or (lambda s: None)
    seq = seq_len or calib.seq_len
    ids = calibration_ids(load_tokenizer(ckpt.folder), CalibConfig(calib.data, tokens, seq, calib.text_field, calib.split,
                                                                   retrieval=1.0 if tail else 0.0))
    stream = LayerStream(ckpt, config, ids)
    L = int(config["num_hidden_layers"])
    new_config = (granite_hybrid_config if target == "granite" else qwen35_text_config)(config, list(range(L)))
    eps = float(config.get("rms_norm_eps", 1e-6))
    kw = dict(position_embeddings=stream.position_embeddings, position_ids=stream.position_ids)
    perturbed: dict[int, torch.Tensor] = {}
    layer_err = {}
    for i in range(L):
        layer = stream.layer_module(i)
        x = stream.attention_input(layer)
        attn = read_attention(ckpt, config, i).to(torch.float32)
        with torch.inference_mode(False), torch.no_grad():
            if target == "granite":
                init = mamba_init or Mamba2Init()
                init = Mamba2Init(**{**init.__dict__, "fit_tokens": min(init.fit_tokens, tokens), "refit_tokens": tokens})
                w, _ = mamba2_from_attention(attn, x.clone(), mamba2_dims(new_config), eps=eps, init=init)
                module = mamba2_module(new_config, i, w)
            else:
                init = gdn_init or GdnInit()
                init = GdnInit(**{**init.__dict__, "fit_tokens": min(init.fit_tokens, tokens), "refit_tokens": tokens})
                w, _ = gdn_from_attention(attn, x.clone(), gdn_dims(new_config), eps=eps, init=init)
                module = gdn_module(new_config, i, w)
            y_lin = linear_layer_output(module, x.clone())
        layer_err[i] = relative_mse(y_lin, attention_output(attn, x))
        for j in perturbed:
            perturbed[j] = layer(perturbed[j], **kw)
        h = stream.hidden + y_lin.to(stream.hidden.dtype)
        perturbed[i] = h + layer.mlp(layer.post_attention_layernorm(h))
        stream.advance(layer)
        del layer
        say(f"rank: layer {i} linearised alone: layer output rel-MSE {layer_err[i]:.4f} ({time.time() - t0:.0f}s)")
    logits = _final_projection(ckpt, config)
    from .search import body_tail_means, scored_positions
    if tail:
        pos, n_body = scored_positions(ids.shape[1], tail, kl_stride)
    else:
        pos = torch.arange(0, ids.shape[1], kl_stride)
    kls, tails = {}, {}
    ref = [torch.log_softmax(logits(stream.hidden[b, pos]), -1) for b in range(ids.shape[0])]
    for i, h in perturbed.items():
        kl = torch.stack([kl_per_position(ref[b], torch.log_softmax(logits(h[b, pos]), -1)).double() for b in range(ids.shape[0])])
        kls[i], tails[i] = body_tail_means(kl, n_body) if tail else (float(kl.mean()), 0.0)
    ranking = sorted(range(L), key=lambda i: -(kls[i] + tails[i]))
    return {
        "metric": "mean per-token KL(source || source with only this layer linearised), nats"
                  + (f"; score = kl + kl_tail, the mean KL at the last {tail} positions of retrieval windows" if tail else ""),
        "tokens": int(ids.numel()),
        "kl_positions_stride": kl_stride,
        "seconds": round(time.time() - t0, 1),
        "ranking": [{"rank": r, "layer": i, "kl": kls[i], **({"kl_tail": tails[i]} if tail else {}), "layer_rel_mse": layer_err[i]}
                    for r, i in enumerate(ranking)],
    }


def format_ranking(ranking: dict) -> str:
    kept = set(ranking.get("kept_attention", []))
    lines = [f"layer ranking ({ranking['metric']}; {ranking['tokens']} tokens):", "  rank  layer        KL  layer-rel-MSE  kept"]
    for r in ranking["ranking"]:
        lines.append(f"  {r['rank']:4d}  {r['layer']:5d}  {r['kl']:8.4f}  {r['layer_rel_mse']:13.4f}  {'attention' if r['layer'] in kept else 'linear'}")
    return "\n".join(lines)


def load_ranking(folder: str | Path) -> dict:
    return json.loads((Path(folder) / RANKING_FILE).read_text())
