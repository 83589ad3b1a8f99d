"""Every supported target on tiny random models carrying real checkpoints' configs
(tests/fixtures/configs: rope types and scaling, biases, q/k norms, windows and tying as shipped),
and every shipped recipe's plan built against its source's stored config.

EXPECTED is the family x target table BENCHMARKS.md quotes: "exact" (logits equal the source's),
"runs" (loads and generates; the lossy steps are measured elsewhere), or "refused: <text the
error must contain>" (nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvsurgeon.convert.pipeline.calibration import CalibConfig
from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.pipeline.driver import ConvertOptions
from real_configs import HUB_IDS, NAMES, real_config, shrink, tiny_from

CALIB = CalibConfig(tokens=256, seq_len=32)
TARGETS = {
    "gqa-same": dict(to="gqa", kv_heads=2),  # the same KV-head count: an exact copy through the whole pipeline
    "mqa-mean": dict(to="mqa", method="mean"),
    "mqa-calibrated": dict(to="mqa"),
    "mla": dict(to="mla", kv_lora_rank=16),
    "hybrid": dict(to="hybrid", linear_layers=[1]),
}
LINEAR = {"Qwen3-8B": "gated-deltanet"}
RUNS = {"gqa-same": "exact", "mqa-mean": "runs", "mqa-calibrated": "runs", "mla": "runs", "hybrid": "runs"}
EXPECTED = {name: dict(RUNS) for name in NAMES}
EXPECTED["Qwen2.5-7B"]["mla"] = "refused: --q-bias fit"  # accepted with the flag: test_preflight.py
EXPECTED["Qwen3-8B"]["mla"] = "refused: RMSNorm"
EXPECTED["Mistral-7B-v0.1"]["mla"] = "refused: --drop-sliding-window"  # accepted with it: test_preflight.py
EXPECTED["Mistral-7B-v0.1"]["hybrid"] = "refused: --drop-sliding-window"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {n: tiny_from(shrink(real_config(n)), root / n) for n in NAMES}


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return m, m(input_ids=ids).logits


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_every_target_on_real_configs(sources, tmp_path, name, target):
    src, expected = sources[name], EXPECTED[name][target]
    kw = dict(TARGETS[target])
    if target == "hybrid":
        kw["linear"] = LINEAR.get(name, "mamba2")
    spec = ConversionSpec(calib=CALIB, **kw)
    out = tmp_path / "out"
    opts = ConvertOptions(out=out, progress=False, measure="off")
    if expected.startswith("refused: "):
        with pytest.raises(KvSurgeonError, match=expected.removeprefix("refused: ").replace("-", r"\-")):
            run_conversion(str(src), spec, opts)
        assert not out.exists()
        return
    run_conversion(str(src), spec, opts)
    ids = torch.randint(2, 120, (1, 20), generator=torch.Generator().manual_seed(0))
    model, got = _logits(out, ids)
    if expected == "exact":
        assert torch.equal(got, _logits(src, ids)[1])
    assert torch.isfinite(got).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 23)


# ---- recipes -------------------------------------------------------------------------------------
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def stored_config(source: str) -> dict:
    names = {v: k for k, v in HUB_IDS.items()}
    if source in names:
        return real_config(names[source])
    from kvsurgeon.convert.io.checkpoint import read_config
    from kvsurgeon.convert.io.resolve import resolve_model

    return read_config(resolve_model(source))  # SmolLM2: the real fixture in the Hub cache


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_plans_build_against_their_source_config(path, smollm2):
    from kvsurgeon.convert.hybrid.fit import resolve_layer_choice
    from kvsurgeon.convert.train.recipe import load_recipe
    from kvsurgeon.convert.hybrid.plan import _target_for

    r, _ = load_recipe(path)
    c = spec = r.conversion  # the recipe's conversion block is the spec itself
    config = stored_config(r.source)
    if c.to == "hybrid":  # the plan itself ranks layers on the weights; its checks are these
        _target_for(config, c.linear or "mamba2")
        resolve_layer_choice(config["num_hidden_layers"], c.keep_attention, c.linear_layers)
        return
    plan = spec.make_plan()(config, None)
    assert plan.new_config["num_hidden_layers"] == config["num_hidden_layers"]


def test_the_recipe_check_can_fail():
    """The llama3 MLA recipe as first shipped (rope dim 64 with llama3 RoPE) is refused by this check."""
    spec = ConversionSpec(to="mla", kv_lora_rank=448, rope_dim=64)
    with pytest.raises(KvSurgeonError, match="llama3"):
        spec.make_plan()(real_config("Llama-3.1-8B"), None)
