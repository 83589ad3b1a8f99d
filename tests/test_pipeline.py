"""The streaming driver: layer-by-layer calibration matches the full model, and an identity plan
reproduces the source exactly through real files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvsurgeon.attention import write_attention
from kvsurgeon.convert.pipeline.calibration import CalibConfig, LayerStream
from kvsurgeon.convert.io.checkpoint import LazyCheckpoint, read_config
from kvsurgeon.convert.pipeline.driver import ConvertOptions, Plan, convert_model

from conftest import save_tiny


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_layer_stream_matches_full_model(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / model_type, model_type)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    stream = LayerStream(LazyCheckpoint(src), read_config(src), ids)
    for i, x in stream:
        torch.testing.assert_close(x, model.model.layers[i].input_layernorm(hs[i]), rtol=1e-5, atol=1e-5)
    # hidden_states[-1] is after the final norm
    torch.testing.assert_close(model.model.norm(stream.hidden), hs[-1], rtol=1e-5, atol=1e-5)


def test_identity_plan_is_exact_and_atomic(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "src")
    seen = []

    def make_plan(config, ckpt):
        def transform(i, attn, x):
            seen.append(None if x is None else tuple(x.shape))
            return write_attention(attn, config, i)

        return Plan(new_config=config, transform=transform, needs_calibration=True)

    opts = ConvertOptions(out=tmp_path / "out", calib=CalibConfig(data=str(text_file), tokens=256, seq_len=64), max_shard_size="30KB")
    res = convert_model(str(src), make_plan, opts)
    assert seen == [(4, 64, 64), (4, 64, 64)]  # 4 windows x 64 tokens x hidden 64, per layer
    assert len(list(res.out.glob("model-*.safetensors"))) > 1
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(res.out).eval()
    ids = torch.randint(0, 128, (1, 20))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "text.jsonl"]


def test_builtin_calibration_text_is_used_by_default(tmp_path):
    from kvsurgeon.convert.pipeline.calibration import DEFAULT_CALIB, calibration_ids
    from kvsurgeon.convert.evaluation.perplexity import load_tokenizer

    assert DEFAULT_CALIB.is_file()
    src = save_tiny(tmp_path / "src")
    ids = calibration_ids(load_tokenizer(src), CalibConfig(tokens=1024, seq_len=128))
    assert ids.shape == (8, 128)


@pytest.mark.parametrize("target_type", ["llama", "deepseek_v3"])
def test_sequential_plan_calibrates_on_the_converted_models_states(tmp_path, text_file, target_type):
    """With ``sequential=True`` layer i sees input_layernorm of the hidden states that the *converted*
    checkpoint (loaded back by transformers) produces, not the source's: checked against the output
    model's own hidden states for a plan that really changes each layer (halved o_proj, or MLA)."""
    from transformers import AutoModelForCausalLM

    from kvsurgeon.convert.pipeline.calibration import calibration_ids
    from kvsurgeon.convert.evaluation.perplexity import load_tokenizer
    from kvsurgeon.convert.mla.plan import mla_plan

    src = save_tiny(tmp_path / "src")
    seen = {}
    if target_type == "llama":
        def make_plan(config, ckpt):
            def transform(i, attn, x):
                seen[i] = x.clone()
                return write_attention(dataclasses.replace(attn, o=attn.o * 0.5), config, i)

            return Plan(new_config=config, transform=transform, needs_calibration=True, sequential=True)
    else:
        inner = mla_plan(kv_lora_rank=24, rope_dim=8)

        def make_plan(config, ckpt):
            plan = inner(config, ckpt)
            transform = plan.transform

            def recording(i, attn, x):
                seen[i] = x.clone()
                return transform(i, attn, x)

            plan.transform = recording
            return plan

    calib = CalibConfig(data=str(text_file), tokens=256, seq_len=64)
    res = convert_model(str(src), make_plan, ConvertOptions(out=tmp_path / "out", calib=calib, dtype="float32"))
    ids = calibration_ids(load_tokenizer(src), calib)
    out = AutoModelForCausalLM.from_pretrained(res.out, dtype=torch.float32, attn_implementation="sdpa").eval()
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        hs = out(input_ids=ids, output_hidden_states=True).hidden_states
        hs_src = source(input_ids=ids, output_hidden_states=True).hidden_states
    assert sorted(seen) == [0, 1]
    for i in (0, 1):
        torch.testing.assert_close(seen[i], out.model.layers[i].input_layernorm(hs[i]), rtol=1e-4, atol=1e-4)
    # and layer 1's input really is not the source's (the test would pass vacuously otherwise)
    assert (seen[1] - source.model.layers[1].input_layernorm(hs_src[1])).abs().max() > 1e-2


def test_calibration_windows_per_text_spreads_the_budget(tmp_path):
    """``windows_per_text=1`` takes each text's first window's worth of tokens, so 3 windows cover 3
    texts; without it they all come from the first, long text."""
    import json

    from kvsurgeon.convert.pipeline.calibration import calibration_ids
    from kvsurgeon.convert.evaluation.perplexity import load_tokenizer

    src = save_tiny(tmp_path / "src")
    tok = load_tokenizer(src)
    marks = "abcd"  # text j is 200 copies of one letter: a window shows which texts it came from
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": m * 200}) + "\n" for m in marks))
    ids_of = {m: tok(m, add_special_tokens=False)["input_ids"][0] for m in marks}

    def texts_seen(ids):
        return ["".join(m for m in marks if ids_of[m] in row.tolist()) for row in ids]

    plain = calibration_ids(tok, CalibConfig(data=str(path), tokens=96, seq_len=32))
    spread = calibration_ids(tok, CalibConfig(data=str(path), tokens=96, seq_len=32, windows_per_text=1))
    assert texts_seen(plain) == ["a", "a", "a"]
    assert texts_seen(spread) == ["a", "b", "bc"]  # 32 tokens of each text, then its eos
