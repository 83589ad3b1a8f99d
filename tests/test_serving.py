"""Which engines serve a checkpoint: the rules in kvsurgeon.attention.serving (the vLLM facts behind
them are asserted against a real vLLM in test_vllm_parity.py), and where they are shown: the
convert summary, `kvsurgeon inspect` and the model card."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvsurgeon.attention.serving import vllm_support
from kvsurgeon.convert.cli import app

from conftest import save_tiny

runner = CliRunner()


def _mla(R, Dr, **kw):
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "kv_lora_rank": R,
            "qk_rope_head_dim": Dr, "q_lora_rank": None, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, **kw}


def _attn(arch, D=64, H=9, hidden=576, **kw):
    return {"architectures": [arch], "hidden_size": hidden, "num_attention_heads": H, "head_dim": D, **kw}


@pytest.mark.parametrize("config, serves, text", [
    (_mla(128, 64), False, "vLLM: no, latent 192 is not in 320/512/576"),
    (_mla(512, 64), True, "-rotary_embedding"),  # served on CPU with the rope-kernel workaround
    (_mla(544, 32), True, "GPU MLA backends only"),  # 576 but not 512 + 64: CPU_MLA refuses it
    (_mla(448, 64), True, "GPU Triton MLA only"),
    (_mla(512, 64, tie_word_embeddings=True), False, "tie_word_embeddings"),
    (_mla(512, 64, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), False, "llama3"),
    (_attn("LlamaForCausalLM"), True, "vLLM: yes"),
    (_attn("LlamaForCausalLM", D=16, H=4, hidden=64), True, "not on CPU: head_dim 16"),
    (_attn("GraniteMoeHybridForCausalLM", D=32, H=4, hidden=256), False, "head_dim = hidden_size / heads"),
    (_attn("GraniteMoeHybridForCausalLM", D=64, H=9, hidden=576), True, "enable_prefix_caching=False"),
    ({"architectures": ["Qwen3_5ForCausalLM"], "text_config": _attn("x", num_hidden_layers=2)}, False, "torchvision"),
    (_attn("GPT2LMHeadModel"), False, "not among the architectures tested"),
])
def test_vllm_support_rules(config, serves, text):
    s = vllm_support(config)
    assert s.serves is serves
    assert text in s.describe(), s.describe()


def test_convert_summary_inspect_and_card_state_serving(tmp_path):
    src = save_tiny(tmp_path / "src", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)
    for out, extra, want in [
        ("mla", [], "vLLM: no, latent 64 is not in 320/512/576"),
        ("mla576", ["--pad-latent-to", "576"], "vLLM: yes"),
    ]:
        res = runner.invoke(app, ["convert", str(src), "--to", "mla", "--kv-lora-rank", "32", "--rope-dim", "32",
                                  "--method", "svd", "--out", str(tmp_path / out), *extra])
        assert res.exit_code == 0, res.output
        assert f"served by {want}" in res.output, res.output
        assert want in (tmp_path / out / "README.md").read_text()
        r = runner.invoke(app, ["inspect", str(tmp_path / out), "--json"])
        assert r.exit_code == 0, r.output
        serving = json.loads(r.output)["serving"]
        assert serving[0]["engine"] == "vLLM" and serving[0]["serves"] is want.endswith("yes")
        r = runner.invoke(app, ["inspect", str(tmp_path / out)])
        assert f"served by {want}" in r.output, r.output
