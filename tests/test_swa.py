"""--to swa: sliding-window layers, training-free. The float64 windowed reference against transformers'
windowed layers, exactness when every layer stays global (real checkpoints, real conversion, CLI),
the window actually acting on long prompts, sources' own windows kept, and each refusal named before
anything is written. vLLM parity of the output classes: tests/test_vllm_swa.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny, tiny_model, tiny_with_dead_layer_2
from kvsurgeon.attention import DictSource, read_attention, sliding_windows
from kvsurgeon.attention.reference import attention_output
from kvsurgeon.convert.cli import app
from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.hub.model_card import read_card_info
from kvsurgeon.convert.pipeline.driver import ConvertOptions
from test_reference import ATOL, RTOL, layer_io

W = 8  # window of the tests' windowed layers
T = 48  # prompt length: 6 windows


def convert(src, out, **spec):
    run_conversion(str(src), ConversionSpec(to="swa", **spec), ConvertOptions(out=out, progress=False, measure="off"))
    return out


@torch.no_grad()
def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits


def prompt(n: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,extra", [("ministral", {}), ("qwen2", {"use_sliding_window": True})])
def test_windowed_reference_matches_transformers(family, extra):
    """transformers' sliding layers compute the float64 reference with ``window``; its full layers the
    reference without one; and the window changes the output here (the control)."""
    model = tiny_model(family, dtype=torch.float64, sliding_window=W, layer_types=["full_attention", "sliding_attention"],
                       **extra)
    ids = torch.randint(2, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    cfg = model.config.to_dict()
    assert sliding_windows(cfg) == {1: W}
    for layer, window in ((0, None), (1, W)):
        x, y = layer_io(model, ids, layer)
        attn = read_attention(DictSource(model.state_dict()), cfg, layer)
        torch.testing.assert_close(attention_output(attn, x, window=window), y, rtol=RTOL, atol=ATOL)
        other = attention_output(attn, x, window=None if window else W)
        assert (other - y).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_all_global_is_the_source(tmp_path, family):
    """Every layer global: the output class computes the source's logits (weights bit for bit); the same
    weights with windows do not, on a prompt longer than the window."""
    src = save_tiny(tmp_path / "src", family, num_hidden_layers=3)
    out = convert(src, tmp_path / "global", window=W, global_layers=[0, 1, 2])
    cfg = json.loads((out / "config.json").read_text())
    want = {"llama": "MinistralForCausalLM", "mistral": "MinistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert cfg["architectures"] == [want] and cfg["layer_types"] == ["full_attention"] * 3
    ids = prompt()
    ref = logits(src, ids)
    torch.testing.assert_close(logits(out, ids), ref, rtol=1e-6, atol=1e-6)
    windowed = convert(src, tmp_path / "windowed", window=W, keep_global=1)
    assert json.loads((windowed / "config.json").read_text())["layer_types"].count("sliding_attention") == 2
    got = logits(windowed, ids)
    torch.testing.assert_close(got[:, :W], ref[:, :W], rtol=1e-6, atol=1e-6)  # inside the window: the same
    assert (got[:, W:] - ref[:, W:]).abs().max() > 1e-2  # beyond it: the window acts


def test_cli_swa_card_and_kv_cache(tmp_path):
    src = save_tiny(tmp_path / "src", num_hidden_layers=4)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["convert", str(src), "--to", "swa", "--window", "16", "--global-layers", "1,3",
                                   "--out", str(out), "--measure", "off"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2 and cfg["sliding_window"] == 16
    info = read_card_info(out)
    assert "--window 16" in info.command and "--global-layers 1,3" in info.command and "--calib" not in info.command
    # half the layers stop at 16 tokens: at 32K the cache is just over half the source's
    assert info.kv_bytes_at_context_after / info.kv_bytes_at_context_before == pytest.approx((32768 + 16) / 65536)
    (vllm,) = [line for line in info.serving if line.startswith("vLLM: yes")]
    assert "--max-num-batched-tokens near the window (16)" in vllm  # without it vLLM keeps window + 4K per layer


def test_source_windows_are_kept(tmp_path):
    """A source that already windows layers (per layer_types) keeps them windowed at its own window."""
    types = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    src = save_tiny(tmp_path / "src", "ministral", num_hidden_layers=4, sliding_window=W, layer_types=types)
    out = convert(src, tmp_path / "out", window=W, global_layers=[3])
    assert sliding_windows(json.loads((out / "config.json").read_text())) == {0: W, 1: W, 2: W}
    with pytest.raises(KvSurgeonError, match=f"pass --window {W}"):
        convert(src, tmp_path / "x", window=2 * W, global_layers=[3])
    with pytest.raises(KvSurgeonError, match=r"layers \[0\] are windowed in the source"):
        convert(src, tmp_path / "x", window=W, global_layers=[0, 3])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw,model,overrides,match", [
    ({"window": 256, "keep_global": 1}, "llama", {}, "not below the context length"),
    ({"window": W, "keep_global": 0}, "llama", {}, "keeps no full-attention layer"),
    ({"window": W, "keep_global": 3}, "llama", {}, "more than the model's 2 layers"),
    ({"window": W, "global_layers": [5]}, "llama", {}, r"\[5\] out of range"),
    ({"window": W, "keep_global": 1}, "qwen3", {}, "converts llama, ministral, mistral, qwen2 sources"),
    ({"window": W, "keep_global": 1}, "llama", {"attention_bias": True}, "attention_bias=true"),
    ({"window": W, "keep_global": 1}, "mistral", {"sliding_window": W}, "already windows every layer"),
])
def test_bad_input_is_refused_before_writing(tmp_path, kw, model, overrides, match):
    src = save_tiny(tmp_path / "src", model, **overrides)
    with pytest.raises(KvSurgeonError, match=match):
        convert(src, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,match", [
    ({}, "--to swa needs --window"),
    ({"window": 0, "keep_global": 1}, "--window must be a whole number"),
    ({"window": 8}, r"needs --keep-global K\|FRACTION .* or --global-layers LIST"),
    ({"window": 8, "keep_global": 1, "global_layers": "0"}, r"needs --keep-global K\|FRACTION .* or --global-layers LIST"),
    ({"window": 8, "global_layers": "a,b"}, "--global-layers 'a,b'"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(KvSurgeonError, match=match):
        ConversionSpec(to="swa", **kw)
    with pytest.raises(KvSurgeonError, match="--window is a sliding-window option; it needs --to swa"):
        ConversionSpec(to="mqa", window=8)


def test_auto_global_layers_follow_the_measured_windowing_cost(tmp_path, text_file):
    """--global-layers auto keeps the layers whose windowing costs most at the end of retrieval windows.
    Planted: layer 2's values are zero, so windowing it changes nothing (cost 0): it must rank last and
    never be kept. The ranking file's cost for the top layer is recomputed here from the reference."""
    src = tiny_with_dead_layer_2(tmp_path / "src")
    out = convert(src, tmp_path / "out", window=16, keep_global=2, global_layers="auto",
                  calib_data=str(text_file), calib_tokens=512)
    ranking = json.loads((out / "kvsurgeon_window_ranking.json").read_text())
    order = [r["layer"] for r in ranking["ranking"]]
    assert order[-1] == 2 and ranking["ranking"][-1]["cost"] == 0.0
    cfg = json.loads((out / "config.json").read_text())
    kept = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    assert kept == sorted(order[:2]) and 2 not in kept
    assert ranking["ranking"][0]["cost"] > ranking["ranking"][1]["cost"] > 0
    card = (out / "README.md").read_text()
    assert "--global-layers auto" in card and "measured windowing cost" in card


def test_search_prunes_end_to_end_and_records_what_it_measured(tmp_path, text_file):
    """--global-layers search: from the ranking's top 2K (here all 4 layers) window one layer at a time,
    the one whose loss raises the tail KL least. Planted: layer 2's values are zero, so windowing it
    changes nothing: it must go first, at KL exactly 0. Each step drops its minimal trial, and the final
    set's recorded KL is recomputed here from the written checkpoint (static layer_types) against the
    source, so the in-place layer switching the search uses is shown to compute the written model."""
    from kvsurgeon.convert.swa.search import SEARCH_WINDOWS, tail_logprobs
    from kvsurgeon.convert.swa.plan import TAIL

    src = tiny_with_dead_layer_2(tmp_path / "src")
    out = convert(src, tmp_path / "out", window=16, keep_global=2, global_layers="search",
                  calib_data=str(text_file), calib_tokens=512)
    found = json.loads((out / "kvsurgeon_window_ranking.json").read_text())["search"]
    steps = found["steps"]
    assert steps[0]["layers"] == [0, 1, 2, 3] and steps[0]["kl"] < 1e-12  # all global is the source
    assert steps[1]["windowed"] == 2 and steps[1]["kl"] < 1e-12
    for st in steps[1:]:
        assert st["kl"] == min(st["trials"].values()) and str(st["windowed"]) in st["trials"]
    assert len(found["layers"]) == 2 and 2 not in found["layers"] and steps[-1]["kl"] > 1e-6
    cfg = json.loads((out / "config.json").read_text())
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == found["layers"]

    from transformers import AutoModelForCausalLM
    from kvsurgeon.convert.pipeline.calibration import CalibConfig
    from kvsurgeon.convert.swa.plan import retrieval_ids
    from kvsurgeon.convert.io.checkpoint import LazyCheckpoint

    ids = retrieval_ids(LazyCheckpoint(src), cfg, 16, CalibConfig(str(text_file), 512))[:SEARCH_WINDOWS]
    target = tail_logprobs(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids, TAIL)
    lp = tail_logprobs(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids, TAIL)
    kl = float((target.exp() * (target - lp)).sum(-1).mean())
    assert kl == pytest.approx(steps[-1]["kl"], rel=1e-4)
    card = (out / "README.md").read_text()
    assert "--global-layers search" in card and "end-to-end search" in card


def test_auto_needs_a_count():
    with pytest.raises(KvSurgeonError, match="--global-layers auto chooses --keep-global K layers"):
        ConversionSpec(to="swa", window=16, global_layers="auto")


def test_swa_composes_with_kv_head_pooling_in_either_order(tmp_path):
    """GQA/MQA pooling and windows are independent in Ministral (num_key_value_heads, layer_types):
    mqa -> swa and swa -> mqa give the same tensors and config, the windows act on the pooled model, and
    an all-global swa of the MQA output is the MQA model exactly. MLA and hybrid outputs have no
    per-layer windows in their stock classes, so swa refuses them (named in the error)."""
    src = save_tiny(tmp_path / "src", num_hidden_layers=4)
    mqa = tmp_path / "mqa"
    run_conversion(str(src), ConversionSpec(to="mqa", method="mean"), ConvertOptions(out=mqa, progress=False, measure="off"))
    a = convert(mqa, tmp_path / "mqa-swa", window=W, global_layers=[0, 2])
    b = tmp_path / "swa-mqa"
    run_conversion(str(convert(src, tmp_path / "swa", window=W, global_layers=[0, 2])), ConversionSpec(to="mqa", method="mean"),
                   ConvertOptions(out=b, progress=False, measure="off"))
    ids = prompt()
    la, lb, lm = logits(a, ids), logits(b, ids), logits(mqa, ids)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["layer_types"] == ["full_attention", "sliding_attention"] * 2
    assert (la - lm).abs().max() > 1e-3  # the windows act at T = 6 windows
    full = convert(mqa, tmp_path / "mqa-allglobal", window=W, global_layers=[0, 1, 2, 3])
    torch.testing.assert_close(logits(full, ids), lm, rtol=1e-5, atol=1e-5)
    mla = tmp_path / "mla"
    run_conversion(str(src), ConversionSpec(to="mla", kv_lora_rank=16, rope_dim=8, method="svd"),
                   ConvertOptions(out=mla, progress=False, measure="off"))
    with pytest.raises(ValueError, match="model_type='deepseek_v3'.*kvsurgeon can convert"):
        convert(mla, tmp_path / "mla-swa", window=W, global_layers=[0, 2])
    assert not (tmp_path / "mla-swa").exists()
