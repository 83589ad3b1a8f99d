"""The convert command end to end through the CLI: real files in, a stock checkpoint out, a model
card, refusal to clobber, and --push-to-hub through the real huggingface_hub client."""

from __future__ import annotations

import json

import torch
from huggingface_hub import snapshot_download
from typer.testing import CliRunner

from conftest import save_tiny
from kvsurgeon.convert.cli import app
from kvsurgeon.convert.hub.model_card import read_card_info
from test_publish import hub  # noqa: F401  (the local Hub fixture)

runner = CliRunner()


def test_convert_gqa_mean_cli(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "src")
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(src), "--to", "gqa", "--kv-heads", "2", "--method", "mean", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_key_value_heads == 2
    info = read_card_info(out)
    assert info.conversion == "gqa" and info.kv_bytes_per_token_after * 2 == info.kv_bytes_per_token_before
    assert "--kv-heads 2" in info.command
    # a second run refuses to replace the output
    res = runner.invoke(app, ["convert", str(src), "--to", "gqa", "--kv-heads", "2", "--method", "mean", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    # impossible head counts are named
    res = runner.invoke(app, ["convert", str(src), "--to", "gqa", "--kv-heads", "3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "3" in res.output
    assert not (tmp_path / "x").exists()


def test_convert_push_to_hub(hub, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "src")
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(src), "--to", "mqa", "--method", "mean", "--out", str(out), "--push-to-hub", "me/tiny-mqa"])
    assert res.exit_code == 0, res.output
    local = snapshot_download("me/tiny-mqa", cache_dir=tmp_path / "dl")
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(local)
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert 'from_pretrained("me/tiny-mqa")' in open(f"{local}/README.md").read()


def test_convert_mla_cli_loads_generates_and_caches_the_latent(tmp_path):
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "src")
    out = tmp_path / "mla"
    res = runner.invoke(app, ["convert", str(src), "--to", "mla", "--kv-lora-rank", "32", "--rope-dim", "8", "--method", "svd", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = AutoModelForCausalLM.from_pretrained(out)
    assert type(m).__name__ == "DeepseekV3ForCausalLM"
    g = m.generate(torch.randint(0, 128, (1, 5)), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layer = g.past_key_values.layers[0]
    assert layer.keys.shape[-1] == 32 and layer.values.shape[-1] == 8  # latent R and the shared rope key Dr
    assert read_card_info(out).kv_bytes_per_token_after == 2 * (32 + 8) * 4
    for bad, msg in ((["--kv-lora-rank", "999"], "kv_lora_rank"), (["--kv-lora-rank", "32", "--rope-dim", "7"], "odd"),
                     (["--kv-lora-rank", "32", "--rope-dim", "32"], "head_dim")):
        res = runner.invoke(app, ["convert", str(src), "--to", "mla", *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and msg in res.output, res.output
