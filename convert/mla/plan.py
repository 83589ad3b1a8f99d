"""GQA/MHA -> DeepSeek MLA: a stock ``DeepseekV3ForCausalLM`` whose cache holds only the latent.

The plan side of ``--to mla``: ``mla_plan`` refuses unsupported sources (``_mla_problems``), sizes
the latent (``_MlaShape``), writes the DeepseekV3 config, and builds the per-layer transform (the
svd baseline or the calibrated fit with its q/o refits, ``MlaTuning``'s measured constants), whose
latent is scaled (``latent_gain``) and padded before ``write_mla``. The math is in ``fit.py``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from kvsurgeon.attention import family_for, head_dim_of, rope_spec
from kvsurgeon.attention.mla_layout import UNTIED_LM_HEAD, MlaWeights, deepseek_config, pad_latent, scale_latent, write_mla

from ..io.checkpoint import LazyCheckpoint
from ..errors import KvSurgeonError, KvSurgeonWarning
from .fit import (
    MlaFit,
    attention_token_weights,
    check_mla_ranks,
    convert_layer_to_mla,
    dropped_rope_reach,
    linearize_qk_norm,
    refit_output,
    refit_queries,
    rope_frequency_plan,
)
from ..pipeline.driver import Plan
from ..retrieval_heads import HEADS_FILE, RETRIEVAL_WEIGHT, RetrievalWeighting
from ..pipeline.preflight import family_problem, refuse, window_note, window_problem

METHODS = ("calibrated", "svd")
Q_BIAS = ("refuse", "fit")
QK_NORM = ("refuse", "fit")



@dataclass(frozen=True)
class MlaTuning:
    """What ``calibrated`` does beyond the joint PCA. Each default was measured on SmolLM2 by the
    ablations behind BENCHMARKS.md (scripts/experiments/mla_constants.py tunes one at a time)."""

    norm_ballast: int = 1  # latent dims that steady rms(latent) for attention sinks
    token_mix: float = 0.5  # tokens weighted by the attention they receive (0: uniform)
    kv_balance: float | None = None  # keys favoured over values in the latent; None: kv_balance() of the cut
    q_refit_stride: int = 4  # least-squares q_proj refit against the converted keys (-75%: 30.5 -> 25.8)
    q_refit_ridge: float = 0.3
    # Per refit query, the heaviest keys whose weights are fitted exactly; the rest share theirs
    # evenly, so the refit's cost stops growing with window x window (scripts/bench_mla_refit.py,
    # SmolLM2 layer 12, 4 windows of 2,048: 13.3 s exact, 6.5 s; held-out layer error 0.2779 both).
    # None: every weight exactly.
    q_refit_keys: int | None = 256
    o_refit_ridge: float = 1e-2  # o_proj refit against the source layer's output
    # Calibrate layer i on the converted layers 0..i-1's hidden states rather than the source's, so the
    # q/o refits also absorb upstream drift (-75% on pydocs-train windows: 25.83 -> 25.22).
    sequential: bool = True
    # The written latent's rms, so kv_a_layernorm's eps (1e-6 in transformers, rms_norm_eps in vLLM:
    # 1e-5 on SmolLM2) is negligible in both engines. At rms ~0.3 the two eps moved SmolLM2's prompt
    # log-probs by 8e-3 between the engines; at 100 they agree to float32 noise.
    latent_rms: float = 100.0
    # With --retrieval-heads, also count each head's attention ``1 + W x copy score`` times in the token
    # weights, so the tokens retrieval heads read weigh more in the latent and the refits. Measured off:
    # on MLA -75% R48/Dr48 at W=130 it moved 4K retrieval and ppl by position by nothing beyond noise.
    token_heads: bool = False


def latent_gain(w: MlaWeights, x, target: float = MlaTuning.latent_rms) -> float:
    """Gain that brings the latent's rms to ``target``: measured on the calibration inputs x when
    there are some, else estimated for unit-variance isotropic inputs (sqrt of the mean squared
    row norm of the latent rows of kv_a)."""
    import torch

    lat = w.kv_a[: w.kv_lora_rank].double()
    if x is None:
        rms = float(lat.pow(2).sum(1).mean().sqrt())
    else:
        c = x.reshape(-1, x.shape[-1]).double() @ lat.T
        if w.kv_a_bias is not None:
            c = c + w.kv_a_bias[: w.kv_lora_rank].double()
        rms = float(c.pow(2).mean().sqrt())
    return target / max(rms, torch.finfo(torch.float32).tiny)


def kv_balance(cache_reduction: float) -> float:
    """How much the joint latent favours keys over values, by how much of the cache is cut.

    Measured on SmolLM2 (train windows disjoint from calibration): at -75% balance 8 beat 1 (ppl
    30.5 vs 47.6); at -50% balance 1 beat 8 (1.33x vs 1.50x the source). A tight latent has to
    spend itself on what the softmax is most sensitive to, the keys; a roomier one does better
    treating both alike. Between the two measured budgets the balance is interpolated
    geometrically (not measured there)."""
    t = min(max((cache_reduction - 0.5) / 0.25, 0.0), 1.0)
    return 8.0 ** t


@dataclass(frozen=True)
class _MlaShape:
    """The written MLA dims for one source config."""

    H: int  # query heads
    G: int  # source KV heads
    D: int  # source head dim
    Dr: int  # shared rope key dims
    R: int  # fitted latent rank (kv_lora_rank)
    R_out: int  # written latent rank (R zero-padded to --pad-latent-to)
    Dn: int  # nope key dims per head: the latent is read in full when R <= G*D - Dr

    @property
    def cache_before(self) -> int:
        return 2 * self.G * self.D

    @property
    def cache_after(self) -> int:
        return self.R_out + self.Dr


def _mla_problems(config: dict, fam, method: str, q_bias: str, qk_norm: str, drop_sliding_window: bool) -> list[str]:
    """Why this source (of family ``fam``) cannot become DeepseekV3 with these options (empty: it can)."""
    problems = []
    if fam.has_qk_norm and qk_norm == "refuse":
        problems.append(
            f"{fam.model_type} applies an RMSNorm to each head's queries and keys, which has no place in DeepSeek "
            "MLA (the latent mixes heads before any norm could act). Pass --qk-norm fit to replace it by "
            "least-squares linear fits on calibration inputs (lossy: BENCHMARKS.md measures it), or use --to gqa/--to "
            "mqa (calibrated merging keeps the norm) or --to hybrid --linear gated-deltanet (Qwen3.5 keeps it exactly)"
        )
    if fam.has_qk_norm and qk_norm == "fit" and method != "calibrated":
        problems.append("--qk-norm fit needs calibration inputs: use --method calibrated (the default), not svd")
    qkv_bias, _ = fam.biases(config)
    if qkv_bias and q_bias == "refuse":
        problems.append(
            f"{fam.model_type} q_proj has a bias, DeepseekV3's q_proj has none. Pass --q-bias fit to fold it into "
            "q_proj by least squares on calibration inputs (lossy; needs --method calibrated)"
        )
    if qkv_bias and q_bias == "fit" and method != "calibrated":
        problems.append("--q-bias fit needs calibration inputs: use --method calibrated (the default), not svd")
    problems.append(window_problem(config, "MLA (DeepseekV3)", drop_sliding_window))
    return [p for p in problems if p]


def _mla_shape(config: dict, kv_lora_rank: int, rope_dim: int | None, pad_latent_to: int | None) -> _MlaShape:
    """The MLA dims, checked against the source (``check_mla_ranks``) and the padding."""
    rope = rope_spec(config)
    H = config["num_attention_heads"]
    G = config.get("num_key_value_heads") or H
    D = head_dim_of(config)
    Dr = rope_dim if rope_dim is not None else min(D, rope.rotary_dim)
    check_mla_ranks(num_kv_heads=G, head_dim=D, v_head_dim=D, rope=rope, kv_lora_rank=kv_lora_rank,
                    rope_dim=Dr, hidden_size=config["hidden_size"])
    R_out = kv_lora_rank if pad_latent_to is None else pad_latent_to - Dr
    if R_out < kv_lora_rank:
        raise KvSurgeonError(
            f"--pad-latent-to {pad_latent_to} is smaller than the latent it pads: kv_lora_rank {kv_lora_rank} + "
            f"rope dim {Dr} = {kv_lora_rank + Dr}"
        )
    return _MlaShape(H=H, G=G, D=D, Dr=Dr, R=kv_lora_rank, R_out=R_out, Dn=min(kv_lora_rank, G * D - Dr))


def _mla_config(config: dict, shape: _MlaShape, bias: bool) -> dict:
    """The DeepseekV3 config: rope_theta reproducing the kept frequencies, scaled rope copied."""
    rope = rope_spec(config)
    _, theta = rope_frequency_plan(rope, shape.Dr)
    rope_parameters = None if rope.rope_type == "default" else {"rope_type": rope.rope_type, "rope_theta": rope.theta, **rope.scaling}
    return deepseek_config(config, shape.R_out, shape.Dr, shape.Dn, shape.D, theta, rope_interleave=True,
                           attention_bias=bias, rope_parameters=rope_parameters)


def _svd_layer(shape: _MlaShape, q_bias: str, t: MlaTuning):
    """The weight-only baseline's per-layer transform: no activations at all."""

    def transform(i, attn, x):
        w = convert_layer_to_mla(attn, None, shape.R, shape.Dr, "svd", MlaFit(qk_nope_head_dim=shape.Dn, q_bias=q_bias))
        return w, None

    return transform


def _calibrated_layer(shape: _MlaShape, q_bias: str, t: MlaTuning, heads: RetrievalWeighting | None = None):
    """The calibrated per-layer transform: token-weighted joint PCA with norm ballast, then the q and
    o refits against the source layer. A per-head q/k norm (``--qk-norm fit``, refused otherwise) is
    first replaced by linear fits (``linearize_qk_norm``); the PCA works on those, while the token
    weights and both refits target the real, normed source. ``heads``: query heads weighted in the
    RoRoPE and whitening by their copy scores (``--retrieval-heads``)."""
    balance = t.kv_balance if t.kv_balance is not None else kv_balance(1 - (shape.R + shape.Dr) / (2 * shape.G * shape.D))
    fit = MlaFit(qk_nope_head_dim=shape.Dn, kv_balance=balance, norm_ballast=min(t.norm_ballast, shape.R - 1), q_bias=q_bias)

    def transform(i, attn, x):
        hw = heads.head_weights(i, attn, x) if heads else None
        tw = attention_token_weights(attn, x, mix=t.token_mix, head_weights=hw if t.token_heads else None)
        lin, norm_info = (attn, {}) if attn.k_norm is None and attn.q_norm is None else linearize_qk_norm(attn, x, tw)
        w = convert_layer_to_mla(lin, x, shape.R, shape.Dr, "calibrated", fit, token_weights=tw, head_weights=hw)
        w.info.update(norm_info)
        w = refit_queries(w, attn, x, stride=t.q_refit_stride, ridge=t.q_refit_ridge, keys=t.q_refit_keys)
        w = refit_output(w, attn, x, ridge=t.o_refit_ridge)
        return w, x

    return transform


def _written(fit_layer, shape: _MlaShape, t: MlaTuning, bias: bool):
    """Per-layer transform writing the fitted layer: latent scaled to ``t.latent_rms``, padded to R_out."""

    def transform(i, attn, x):
        w, x_used = fit_layer(i, attn, x)
        return write_mla(pad_latent(scale_latent(w, latent_gain(w, x_used, t.latent_rms)), shape.R_out), i, attention_bias=bias)

    return transform


def _summary(shape: _MlaShape, method: str, extra: str) -> str:
    before, after = shape.cache_before, shape.cache_after
    padded = f" (latent {shape.R} zero-padded to {shape.R_out}, exact)" if shape.R_out > shape.R else ""
    how = ("per-frequency PCA of calibration keys for the rope key, joint PCA of calibration K_nope/V"
           if method == "calibrated" else "weight-only joint SVD of [W_k_nope; W_v]")
    return (
        f"GQA {shape.H}/{shape.G} (head_dim {shape.D}) -> DeepSeek MLA: latent rank {shape.R}{padded} + shared rope key {shape.Dr} "
        f"= {after} cached values per token per layer instead of {before} ({1 - after / before:.0%} smaller), "
        f"{method} ({how})."
        + extra
    )


def rope_reach_note(config: dict, rope_dim: int) -> str:
    """A sentence for the card (and a warning) when the shared rope key drops a RoPE frequency that turns a radian
    within the source's context: past about that distance those dims lose relative position. "" otherwise."""
    rope = rope_spec(config)
    reach, context = dropped_rope_reach(rope, rope_dim), config.get("max_position_embeddings")
    if reach is None or not context or reach >= context:
        return ""
    return (f" The shared rope key keeps the {rope_dim // 2} fastest of the source's {rope.rotary_dim // 2} RoPE frequencies; "
            f"the fastest one dropped turns a radian over {reach:,.0f} tokens, so beyond about that distance (the source "
            f"serves {context:,}) its dims no longer tell near from far: a larger --rope-dim keeps long-context retrieval "
            f"(measured on SmolLM2 with only those dims unrotated: at a 316-token reach the source itself retrieves "
            f"nothing at 1K, at 5,623 it keeps its 4K passkey).")


def mla_plan(kv_lora_rank: int, rope_dim: int | None = None, method: str = "calibrated", pad_latent_to: int | None = None,
             q_bias: str = "refuse", drop_sliding_window: bool = False, tuning: MlaTuning = MlaTuning(),
             qk_norm: str = "refuse", retrieval_weight: float = RETRIEVAL_WEIGHT):
    """``tuning``: the calibrated method's measured constants (``MlaTuning``).
    ``q_bias``: "refuse" or "fit" (``--q-bias fit``: fold a source query bias into q_proj by least
    squares on calibration inputs; DeepseekV3's q_proj has no bias). ``qk_norm``: "refuse" or "fit"
    (``--qk-norm fit``: replace a per-head q/k RMSNorm by least-squares linear q/k rows fitted on
    calibration inputs, ``linearize_qk_norm``; lossy). ``drop_sliding_window``: convert a
    windowed source to full attention (DeepseekV3 has no windows) and say so in the card.
    ``pad_latent_to``: write the cache as this many values per token per layer (kv_lora_rank +
    rope dim), zero-padding the fitted latent exactly (``pad_latent``): for engines that take only
    certain latent sizes (vLLM: 576). The padding is stored and cached, so it costs what it says.
    ``retrieval_weight``: the calibrated fit counts each query head's errors ``1 + retrieval_weight * copy
    score`` times (``RetrievalWeighting``), the scores written beside the model (``HEADS_FILE``)."""
    t = tuning
    if method not in METHODS:
        raise KvSurgeonError(f"unknown --method {method!r} for --to mla; choose one of {', '.join(METHODS)}")
    if q_bias not in Q_BIAS:
        raise KvSurgeonError(f"unknown --q-bias {q_bias!r}; choose one of {', '.join(Q_BIAS)}")
    if qk_norm not in QK_NORM:
        raise KvSurgeonError(f"unknown --qk-norm {qk_norm!r}; choose one of {', '.join(QK_NORM)}")

    def make_plan(config: dict, ckpt: LazyCheckpoint) -> Plan:
        fam = family_for(config)
        refuse("cannot convert to MLA", [family_problem(config, "mla")])  # before the per-feature checks: one reason
        refuse("cannot convert to MLA", _mla_problems(config, fam, method, q_bias, qk_norm, drop_sliding_window))
        shape = _mla_shape(config, kv_lora_rank, rope_dim, pad_latent_to)
        qkv_bias, o_bias = fam.biases(config)
        bias = qkv_bias or o_bias
        heads = RetrievalWeighting(retrieval_weight) if method == "calibrated" and retrieval_weight > 0 else None
        fit_layer = _svd_layer(shape, q_bias, t) if method == "svd" else _calibrated_layer(shape, q_bias, t, heads)
        extra = (" The source's q bias was folded into q_proj by least squares on calibration inputs (--q-bias fit)."
                 if qkv_bias and q_bias == "fit" else "") + (
            " The source's per-head q/k RMSNorm has no place in DeepSeek MLA: it was replaced by least-squares linear "
            "q/k projections fitted on calibration inputs (--qk-norm fit, lossy)." if fam.has_qk_norm else ""
        ) + (window_note(config) if drop_sliding_window else "")
        if reach := rope_reach_note(config, shape.Dr):
            warnings.warn(reach.strip(), KvSurgeonWarning, stacklevel=2)
        return Plan(
            new_config=_mla_config(config, shape, bias),
            transform=_written(fit_layer, shape, t, bias),
            needs_calibration=(method == "calibrated"),
            copies=dict(UNTIED_LM_HEAD),
            sequential=t.sequential,
            summary=_summary(shape, method, (f" In the fit, query heads were {heads.summary()}." if heads else "") + extra + reach),
            files={HEADS_FILE: heads.record} if heads else {},
            on_calibration=heads.on_calibration if heads else None,
        )

    return make_plan
