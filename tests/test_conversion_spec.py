"""One conversion spec: the CLI's flags, the recipe's ``conversion:`` block and the model card's
reproducing command all come from ``ConversionSpec``'s fields, and each round-trips."""

from __future__ import annotations

import shlex
from dataclasses import asdict, fields

import pytest
import typer

from kvsurgeon.convert.cli import app, spec_from_argv
from kvsurgeon.convert.pipeline.spec import ConversionSpec, cli_command, spec_flag
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.train.recipe import RecipeError, recipe_from_dict

SPECS = [
    ConversionSpec(to="mqa"),
    ConversionSpec(to="gqa", kv_heads=2, method="mean"),
    ConversionSpec(to="mla", kv_lora_rank=128, rope_dim=64, pad_latent_to=576, q_bias="fit", qk_norm="fit", drop_sliding_window=True,
                   calib_data="calib.jsonl", calib_tokens=4096, calib_seq_len=1024, calib_windows_per_text=2,
                   calib_retrieval=0.5, text_field="body"),
    ConversionSpec(to="hybrid", keep_attention=0.5, linear_layers="auto", linear="gated-deltanet", transfer_tokens=8192),
    ConversionSpec(to="hybrid", linear_layers=[0, 3, 5]),
    ConversionSpec(to="swa", window=512, keep_global=0.25),
    ConversionSpec(to="swa", window=256, global_layers=[0, 15, 29]),
    ConversionSpec(to="swa", window=256, keep_global=8, global_layers="auto", calib_data="c.jsonl"),
    ConversionSpec(to="mqa", pooled_rope_planes=0),
    ConversionSpec(to="gqa", kv_heads=2, serve_context=2048),
]


BASE = {"data": {"train": "t.jsonl"}, "stages": [{"tokens": 1024}]}


parse_cli = spec_from_argv  # ``kvsurgeon convert ARGV`` parsed by the real click command, nothing runs


def test_every_spec_field_is_a_cli_flag_with_help():
    cmd = typer.main.get_command(app).commands["convert"]
    opts = {o for p in cmd.params for o in p.opts}
    helps = {p.name: p.help for p in cmd.params}
    for f in fields(ConversionSpec):
        assert spec_flag(f) in opts, f"ConversionSpec.{f.name} has no CLI flag"
        assert helps[f.name] and helps[f.name] == f.metadata["help"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.to)
def test_cli_spec_card_command_round_trip(spec):
    command = cli_command("src-model", spec, "out-dir", ["--dtype", "bfloat16"])
    argv = shlex.split(command)[2:]  # drop "kvsurgeon convert"
    assert argv[0] == "src-model" and "--out" in argv
    assert parse_cli(argv) == spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.to)
def test_recipe_conversion_block_round_trip(spec):
    block = {k: v for k, v in asdict(spec).items()}
    r = recipe_from_dict({"source": "s", "output": "o", "conversion": block, **BASE})
    assert r.conversion == spec


def test_card_command_keeps_every_non_default_option():
    """The drift this design removes: windows-per-text, the text field and the revision used to be dropped."""
    spec = SPECS[2]
    command = cli_command("m", spec, "o", ["--revision", "abc"])
    for flag in ("--calib-windows-per-text 2", "--calib-retrieval 0.5", "--text-field body", "--q-bias fit", "--qk-norm fit",
                 "--drop-sliding-window", "--pad-latent-to 576", "--revision abc"):
        assert flag in command, flag


def test_bad_options_fail_the_same_way_everywhere():
    with pytest.raises(KvSurgeonError, match="--to mla needs --kv-lora-rank"):
        parse_cli(["m", "--to", "mla", "--out", "o"])
    with pytest.raises(RecipeError, match="conversion: --to mla needs --kv-lora-rank"):
        recipe_from_dict({"source": "s", "output": "o", "conversion": {"to": "mla"}, **BASE})
    with pytest.raises(RecipeError, match="'conversion.to': required"):
        recipe_from_dict({"source": "s", "output": "o", "conversion": {"method": "mean"}, **BASE})
    with pytest.raises(RecipeError, match="did you mean 'calib_tokens'"):
        recipe_from_dict({"source": "s", "output": "o", "conversion": {"to": "mqa", "calib_token": 5}, **BASE})
    for bad in (["--to", "mla", "--kv-lora-rank", "64"], ["--to", "gqa", "--kv-heads", "2", "--method", "mean"]):
        with pytest.raises(KvSurgeonError, match="--pooled-rope-planes tunes the calibrated KV-head merge"):
            parse_cli(["m", *bad, "--pooled-rope-planes", "0", "--out", "o"])
    with pytest.raises(KvSurgeonError, match="whole number >= 0"):
        parse_cli(["m", "--to", "mqa", "--pooled-rope-planes", "-1", "--out", "o"])
    for bad in (["--to", "mla", "--kv-lora-rank", "64"], ["--to", "mqa", "--method", "mean"]):
        with pytest.raises(KvSurgeonError, match="--serve-context tunes the calibrated KV-head merge"):
            parse_cli(["m", *bad, "--serve-context", "1024", "--out", "o"])
    with pytest.raises(KvSurgeonError, match="pass one of the two"):
        parse_cli(["m", "--to", "mqa", "--serve-context", "1024", "--pooled-rope-planes", "4", "--out", "o"])
    with pytest.raises(KvSurgeonError, match="whole number of tokens >= 1"):
        parse_cli(["m", "--to", "mqa", "--serve-context", "0", "--out", "o"])
    with pytest.raises(KvSurgeonError, match="--linear-layers 'x,y'"):
        ConversionSpec(to="hybrid", linear_layers="x,y")


def test_retrieval_calibration_defaults_per_target():
    """Hybrids and MLA calibrate with retrieval pairs in half the windows unless told otherwise (measured:
    passkey 90/50/30% -> 100/100/100% at 1K/2K/4K for 50% Mamba2 on SmolLM2, MLA -50% 90/60% -> 100/70% at
    1K/2K, BENCHMARKS.md); GQA/MQA keep 0 (a trade there); an explicit value, 0 included, wins."""
    assert ConversionSpec(to="hybrid", keep_attention=0.5).calib_config().retrieval == 0.5
    assert ConversionSpec(to="mla", kv_lora_rank=64).calib_config().retrieval == 0.5
    assert ConversionSpec(to="mla", kv_lora_rank=64, calib_retrieval=0.0).calib_config().retrieval == 0.0
    assert ConversionSpec(to="hybrid", keep_attention=0.5, calib_retrieval=0.0).calib_config().retrieval == 0.0
    assert ConversionSpec(to="mqa").calib_config().retrieval == 0.0
    assert ConversionSpec(to="mqa", calib_retrieval=0.25).calib_config().retrieval == 0.25
    assert "--calib-retrieval" not in cli_command("src", ConversionSpec(to="hybrid", keep_attention=0.5), "out")
