"""Preflight: unsupported sources are refused with one error naming the problem and the fix, before
anything is written (the --out folder never appears, the source is untouched); legacy buffers are
dropped by the family's table; sliding windows are kept (GQA/MQA) or refused unless dropped on
request (MLA, hybrid)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kvsurgeon.convert.cli import app
from kvsurgeon.convert.hub.model_card import read_card_info
from real_configs import TINY_WINDOW, real_config, shrink, tiny_from

runner = CliRunner()
CALIB = ["--calib-tokens", "256", "--calib-seq-len", "32", "--measure", "off"]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def refused(tmp_path, src, *args) -> str:
    out = tmp_path / "out"
    before = digest(src)
    res = runner.invoke(app, ["convert", str(src), *args, "--out", str(out), *CALIB])
    assert res.exit_code == 2, res.output
    assert not out.exists(), "a refusal must write nothing"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    assert digest(src) == before
    return " ".join(res.output.split())


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


IDS = torch.randint(2, 120, (1, 3 * TINY_WINDOW), generator=torch.Generator().manual_seed(0))


def test_qwen2_to_mla_is_refused_up_front_with_a_cli_flag_named(tmp_path):
    src = tiny_from(shrink(real_config("Qwen2.5-7B")), tmp_path / "src")
    msg = refused(tmp_path, src, "--to", "mla", "--kv-lora-rank", "16")
    assert "--q-bias fit" in msg and "q_bias='fit'" not in msg
    # the flag it names exists and gets past the refusal
    out = tmp_path / "mla"
    res = runner.invoke(app, ["convert", str(src), "--to", "mla", "--kv-lora-rank", "16", "--q-bias", "fit", "--out", str(out), *CALIB])
    assert res.exit_code == 0, res.output
    assert "--q-bias fit" in read_card_info(out).command
    assert torch.isfinite(logits(out, IDS)).all()


def test_qwen3_to_mla_refused_naming_the_flag_and_the_alternatives(tmp_path):
    src = tiny_from(shrink(real_config("Qwen3-8B")), tmp_path / "src")
    msg = refused(tmp_path, src, "--to", "mla", "--kv-lora-rank", "16")
    assert "RMSNorm" in msg and "--qk-norm fit" in msg and "--to gqa" in msg
    # the fit needs calibration: refused with svd, still before anything is written
    msg = refused(tmp_path, src, "--to", "mla", "--kv-lora-rank", "16", "--qk-norm", "fit", "--method", "svd")
    assert "--qk-norm fit needs calibration" in msg


def test_every_problem_in_one_error(tmp_path):
    cfg = shrink(real_config("Qwen2.5-7B"), use_sliding_window=True, max_window_layers=1)
    src = tiny_from(cfg, tmp_path / "src")
    msg = refused(tmp_path, src, "--to", "mla", "--kv-lora-rank", "16")
    assert "--q-bias fit" in msg and "--drop-sliding-window" in msg


def _add_tensor(src: Path, name: str, t: torch.Tensor) -> None:
    shard = sorted(src.glob("*.safetensors"))[0]
    sd = load_file(shard)
    sd[name] = t
    save_file(sd, shard, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.exists():
        j = json.loads(index.read_text())
        j["weight_map"][name] = shard.name
        index.write_text(json.dumps(j))


def test_legacy_inv_freq_buffers_are_dropped(tmp_path):
    src = tiny_from(shrink(real_config("Llama-3.1-8B")), tmp_path / "src")
    ref = logits(src, IDS)
    for name in ("model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq"):
        _add_tensor(src, name, torch.arange(8, dtype=torch.float32))
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(src), "--to", "gqa", "--kv-heads", "2", "--out", str(out), *CALIB])
    assert res.exit_code == 0, res.output
    from kvsurgeon.convert.io.checkpoint import LazyCheckpoint

    assert not [k for k in LazyCheckpoint(out).keys() if "inv_freq" in k]
    assert torch.equal(logits(out, IDS), ref)  # same KV heads: an exact copy


def test_unknown_tensor_refused_before_writing(tmp_path):
    src = tiny_from(shrink(real_config("Llama-3.1-8B")), tmp_path / "src")
    _add_tensor(src, "model.layers.0.self_attn.q_proj.bias", torch.zeros(16 * 8))  # attention_bias is false
    msg = refused(tmp_path, src, "--to", "mqa", "--method", "mean")
    assert "q_proj.bias" in msg and "attention_bias" in msg


def test_mismatched_shape_refused_before_writing(tmp_path):
    src = tiny_from(shrink(real_config("Llama-3.1-8B")), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the weights have 2
    cfg["num_attention_heads"] = 16
    (src / "config.json").write_text(json.dumps(cfg))
    msg = refused(tmp_path, src, "--to", "mqa", "--method", "mean")
    assert "k_proj.weight has shape" in msg and "fix config.json" in msg


# ---- sliding windows -----------------------------------------------------------------------------
WINDOWED = {
    "mistral-v0.1": lambda: shrink(real_config("Mistral-7B-v0.1")),
    "qwen2-use_sliding_window": lambda: shrink(real_config("Qwen2.5-7B"), use_sliding_window=True, max_window_layers=0),
}


@pytest.mark.parametrize("which", sorted(WINDOWED))
def test_gqa_keeps_the_source_class_and_its_windows(tmp_path, which):
    cfg = WINDOWED[which]()
    src = tiny_from(cfg, tmp_path / "src")
    ref = logits(src, IDS)
    # control: the window changes the logits on this input, so keeping it is observable
    unwindowed = tmp_path / "nowin"
    tiny_from({**cfg, "sliding_window": None, "use_sliding_window": False}, unwindowed)
    assert (logits(unwindowed, IDS) - ref).abs().max() > 1e-3
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(src), "--to", "gqa", "--kv-heads", "2", "--out", str(out), *CALIB])
    assert res.exit_code == 0, res.output
    new = json.loads((out / "config.json").read_text())
    assert new["sliding_window"] == TINY_WINDOW and new["architectures"] == cfg["architectures"]
    assert torch.equal(logits(out, IDS), ref)
    res = runner.invoke(app, ["convert", str(src), "--to", "mqa", "--method", "mean", "--out", str(tmp_path / "mqa"), *CALIB])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "mqa" / "config.json").read_text())["sliding_window"] == TINY_WINDOW


@pytest.mark.parametrize("target", [["--to", "mla", "--kv-lora-rank", "16"], ["--to", "hybrid", "--linear-layers", "1"]])
def test_mla_and_hybrid_refuse_windows_unless_dropped(tmp_path, target):
    src = tiny_from(shrink(real_config("Mistral-7B-v0.1")), tmp_path / "src")
    msg = refused(tmp_path, src, *target)
    assert "sliding-window" in msg and "--drop-sliding-window" in msg
    out = tmp_path / "dropped"
    res = runner.invoke(app, ["convert", str(src), *target, "--drop-sliding-window", "--out", str(out), *CALIB])
    assert res.exit_code == 0, res.output
    info = read_card_info(out)
    assert "Sliding windows dropped" in info.summary and "--drop-sliding-window" in info.command
    assert torch.isfinite(logits(out, IDS)).all()
