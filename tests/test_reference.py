"""The float64 references in kvsurgeon.attention.reference against transformers' own modeling code:
softmax attention over families x rope types (scaling active at the tested length), and MLA as
DeepseekV3 runs it, for default and llama3 rope. Every transform and refit calls these, so a
reference that departs from transformers would make every fit aim at the wrong function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from kvsurgeon.attention import DictSource, read_attention
from kvsurgeon.attention.reference import (
    ROW_BLOCK,
    _values as ref_values,
    attention_output,
    causal_attention,
    causal_prob_blocks,
    causal_softmax,
    head_outputs,
    mla_attention_output,
    received_attention,
    source_probs,
    tail_attention_outputs,
)
from kvsurgeon.convert.mla.fit import convert_layer_to_mla

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "experiments"))
from mla_tools import mla_config, mla_state_dict  # noqa: E402

T = 64
# original context 16 < T: the scaled frequencies differ from the unscaled ones at these positions
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}
# float64 model, but transformers builds cos/sin in float32: ~1e-7 relative
RTOL, ATOL = 1e-5, 1e-6


def layer_io(model, ids, layer: int):
    """(input, output) of one layer's self_attn on ids."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"].clone()), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: seen.update(y=o[0].clone()))
    with torch.no_grad():
        model(ids)
    h1.remove(), h2.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_attention_reference_matches_transformers(family, rope):
    model = tiny_model(family, dtype=torch.float64, rope_parameters=dict(ROPES[rope]), max_position_embeddings=256)
    ids = torch.randint(2, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    x, y = layer_io(model, ids, 1)
    attn = read_attention(DictSource(model.state_dict()), model.config.to_dict(), 1)
    assert (attn.q_bias is not None) == (family == "qwen2") and (attn.k_norm is not None) == (family == "qwen3")
    assert attn.rope.rope_type == rope
    torch.testing.assert_close(attention_output(attn, x), y, rtol=RTOL, atol=ATOL)
    assert y.abs().max() > 1e-2
    if rope != "default":  # the sweep can fail: unscaled tables give a measurably different layer
        unscaled = attention_output(attn, x, inv_freq=attn.rope.inv_freq(), attention_scaling=1.0)
        assert (unscaled - y).abs().max() > 100 * ATOL


def test_attention_reference_takes_bf16_inputs():
    model = tiny_model("llama", dtype=torch.float64)
    attn = read_attention(DictSource(model.state_dict()), model.config.to_dict(), 0)
    x = torch.randn(1, 16, model.config.hidden_size, dtype=torch.bfloat16)
    torch.testing.assert_close(attention_output(attn, x), attention_output(attn, x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tail_outputs_equal_the_full_reference_rows(family):
    """The windowing ranking scores only the last rows; they must be the full reference's rows, windowed
    or not (and a window must change them, or the comparison would be vacuous)."""
    model = tiny_model(family, dtype=torch.float64)
    attn = read_attention(DictSource(model.state_dict()), model.config.to_dict(), 1)
    x = torch.randn(2, 40, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full, local = tail_attention_outputs(attn, x, 6, (None, 8))
    torch.testing.assert_close(full, attention_output(attn, x)[:, -6:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local, attention_output(attn, x, window=8)[:, -6:], rtol=1e-12, atol=1e-12)
    assert (local - full).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block", [1, 7, 37, 100])
def test_row_blocks_give_each_row_the_full_rows_softmax(block, window):
    """Scoring by blocks of query rows, with each block's keys cut at its last row (and at the window's
    start), is the one softmax over full rows: probabilities placed back and outputs both match."""
    g = torch.Generator().manual_seed(3)
    S = torch.randn(3, 37, 37, generator=g, dtype=torch.float64) * 4
    v = torch.randn(3, 37, 5, generator=g, dtype=torch.float64)
    full = causal_softmax(S, window)
    placed = torch.zeros_like(full)
    for s, e, lo, p in causal_prob_blocks(lambda s, e, lo: S[:, s:e, lo:e], 37, window, block):
        placed[:, s:e, lo:e] = p
    torch.testing.assert_close(placed, full, rtol=0, atol=1e-15)
    out = causal_attention(lambda s, e, lo: S[:, s:e, lo:e], v, window, block)
    torch.testing.assert_close(out, full @ v, rtol=1e-13, atol=1e-13)


def test_long_windows_scored_in_row_blocks_match_transformers_and_the_full_rows():
    """Past ``ROW_BLOCK`` tokens the source reference scores several blocks of rows: its output is still
    transformers' layer, the windowed output and received attention still those of the full (H, T, T)
    probabilities."""
    T_long = ROW_BLOCK + 88
    model = tiny_model("llama", dtype=torch.float64, max_position_embeddings=1024)
    ids = torch.randint(2, model.config.vocab_size, (1, T_long), generator=torch.Generator().manual_seed(0))
    x, y = layer_io(model, ids, 1)
    attn = read_attention(DictSource(model.state_dict()), model.config.to_dict(), 1)
    torch.testing.assert_close(attention_output(attn, x), y, rtol=RTOL, atol=ATOL)
    v = ref_values(attn, x[0])[attn.kv_index()]
    for window in (None, 100):
        full = (source_probs(attn, x[0], window) @ v).transpose(0, 1)[None]
        torch.testing.assert_close(head_outputs(attn, x, window=window), full, rtol=1e-12, atol=1e-12)
    probs = source_probs(attn, x[0])
    for power in (1.0, 2.0):
        torch.testing.assert_close(received_attention(attn, x[0], power), probs.pow(power).sum((0, 1)), rtol=1e-12, atol=1e-12)
    # head weights: head h's probabilities count w_h times
    hw = torch.arange(1.0, attn.num_heads + 1)
    torch.testing.assert_close(received_attention(attn, x[0], head_weights=hw),
                               (hw.double()[:, None, None] * probs).sum((0, 1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("rope", "T_mla"), [("default", T), ("llama3", T), ("default", ROW_BLOCK + 88)])
def test_mla_reference_matches_deepseek_v3(rope, T_mla):
    """A Llama with ``rope`` converted to MLA at full rank (SVD) is written as a DeepseekV3 that carries
    the same rope_parameters; the MLA reference reproduces transformers' DeepseekV3 layer on the same
    inputs (past ``ROW_BLOCK`` tokens, scored by blocks of query rows)."""
    torch.manual_seed(0)
    D, H, G, hid = 16, 4, 2, 64
    cfg = LlamaConfig(vocab_size=128, hidden_size=hid, intermediate_size=48, num_hidden_layers=2, num_attention_heads=H,
                      num_key_value_heads=G, head_dim=D, max_position_embeddings=1024, rms_norm_eps=1e-12,
                      tie_word_embeddings=False, rope_parameters=dict(ROPES[rope]))
    src = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float64).eval()
    with torch.no_grad():
        for p in src.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    ids = torch.randint(3, 128, (2, T_mla), generator=torch.Generator().manual_seed(1))
    sd = DictSource(src.state_dict())
    ws = []
    for i in range(2):
        x, _ = layer_io(src, ids, i)
        ws.append(convert_layer_to_mla(read_attention(sd, src.config.to_dict(), i), x, G * 2 * D - D, D, method="svd"))
    assert ws[0].info.get("rope_type", "default") == rope
    mcfg = mla_config(src.config.to_dict(), ws, rope=read_attention(sd, src.config.to_dict(), 0).rope)
    for k in ("architectures", "model_type"):
        mcfg.pop(k)
    mla = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**mcfg), attn_implementation="eager", dtype=torch.float64).eval()
    mla.load_state_dict(mla_state_dict(src.state_dict(), ws), strict=True)
    x, y = layer_io(mla, ids, 1)
    # larger weights than the sweep's (scores ~10): float32 cos/sin show as ~1e-6 of the output's scale,
    # growing with position (the float32 angle t * freq): 5.9e-6 at 600 tokens, blocked or not
    err = float((mla_attention_output(ws[1], x) - y).abs().max() / y.abs().max())
    print(f"MLA reference vs DeepseekV3 ({rope}, {T_mla} tokens): max error {err:.2e} of max |y|")
    assert err < 2e-6 * max(1, T_mla / T)
    if rope != "default":  # the same layer with unscaled frequencies is far off: the sweep can fail
        plain = dict(ws[1].info)
        plain.pop("rope_type")
        w_plain = type(ws[1])(**{**ws[1].__dict__, "info": plain})
        assert float((mla_attention_output(w_plain, x) - y).abs().max() / y.abs().max()) > 1e-3


# ---- families beyond Llama: each feature the reference models, against transformers, with a control ----
def _family_model(name: str, layers: int = 2, **overrides):
    """A float64 random model of a shrunk real config (tests/real_configs.py), weights widened so
    norms and heads differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from real_configs import attn_impl, real_config, shrink

    cfg = shrink(real_config(name), layers=layers, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float64,
                                             attn_implementation=attn_impl(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif p.dim() == 1:
                p.normal_(0, 0.3)
    return model, cfg


# name, layer, overrides, control: the same weights read without one feature (must be far off)
FAMILY_CASES = {
    # a soft cap that bites at these score sizes (the shipped 50 needs larger scores than random weights give)
    "gemma2-softcap": ("gemma-2-2b", 0, dict(attn_logit_softcapping=2.0), dict(softcap=None)),
    "gemma2-scalar": ("gemma-2-2b", 1, {}, dict(scaling=None)),
    "gemma3-norm-offset": ("gemma-3-1b", 5, {}, dict(norm_offset=0.0)),
    "gemma3-local-rope": ("gemma-3-1b", 0, {}, "global-rope"),
    "olmo2-projection-norm": ("OLMo-2-1B", 1, {}, "per-head-norm"),
    "granite-multiplier": ("granite-3.1-2b", 1, {}, dict(scaling=None)),
    "phi3-longrope": ("Phi-3-mini-128k", 1, {}, "unscaled-rope"),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_family_reference_matches_transformers(case):
    from kvsurgeon.attention import rope_spec, sliding_windows

    name, layer, overrides, control = FAMILY_CASES[case]
    layers = 6 if name == "gemma-3-1b" else 2
    model, cfg = _family_model(name, layers, **overrides)
    ids = torch.randint(2, 128, (2, T), generator=torch.Generator().manual_seed(0))
    x, y = layer_io(model, ids, layer)
    attn = read_attention(DictSource(model.state_dict()), cfg, layer)
    window = sliding_windows(cfg).get(layer)
    # transformers' eager Gemma-2 attention takes its softmax in float32 even in a float64 model
    atol = 1e-5 if name == "gemma-2-2b" else ATOL
    torch.testing.assert_close(attention_output(attn, x, window=window), y, rtol=RTOL, atol=atol)
    assert y.abs().max() > 1e-2
    if control == "global-rope":  # layer 0 is a sliding layer: its RoPE is the local one, not the global
        other = attn.with_(rope=rope_spec(cfg, 5))
        assert other.rope.theta != attn.rope.theta
    elif control == "per-head-norm":  # the same weights, norms applied per head
        other = attn.with_(qk_norm_scope="head", q_norm=attn.q_norm.mean(0), k_norm=attn.k_norm.mean(0))
    elif control == "unscaled-rope":
        assert attn.rope.rope_type == "longrope"
        other = attn.with_(rope=type(attn.rope)(attn.rope.theta, attn.rope.head_dim, attn.rope.rotary_dim))
    else:
        other = attn.with_(**control)
    assert (attention_output(other, x, window=window) - y).abs().max() > 100 * atol
