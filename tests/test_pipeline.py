"""The streaming driver: layer-by-layer calibration matches the full model, and an identity plan
reproduces the source exactly through real files."""

from __future__ import annotations

import pytest
import torch

from kvsurgeon.attention import write_attention
from kvsurgeon.convert.calibration import CalibConfig, LayerStream
from kvsurgeon.convert.checkpoint import LazyCheckpoint, read_config
from kvsurgeon.convert.pipeline import ConvertOptions, Plan, convert_model

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
    from kvsurgeon.convert.calibration import DEFAULT_CALIB, calibration_ids
    from kvsurgeon.convert.evaluate import load_tokenizer

    assert DEFAULT_CALIB.is_file()
    src = save_tiny(tmp_path / "src")
    ids = calibration_ids(load_tokenizer(src), CalibConfig(tokens=1024, seq_len=128))
    assert ids.shape == (8, 128)
