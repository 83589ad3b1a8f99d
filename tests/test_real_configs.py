"""Every supported target on tiny random models carrying real checkpoints' configs
(tests/fixtures/configs: rope types and scaling, biases, q/k norms, windows and tying as shipped),
and every shipped recipe's plan built against its source's stored config.

EXPECTED is the family x target table BENCHMARKS.md quotes: "exact" (logits equal the source's),
"runs" (loads and generates; the lossy steps are measured elsewhere), "runs with --flag value"
(refused without the flag, naming it, nothing written; loads and generates with it), or "refused:
<text the error must contain>" (nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvsurgeon.convert.pipeline.calibration import CalibConfig
from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.pipeline.driver import ConvertOptions
from real_configs import HUB_IDS, LAYERS, NAMES, attn_impl, real_config, shrink, tiny_from

CALIB = CalibConfig(tokens=256, seq_len=32)
TARGETS = {
    "gqa-same": dict(to="gqa"),  # the source's own KV-head count: an exact copy through the whole pipeline
    "mqa-mean": dict(to="mqa", method="mean"),
    "mqa-calibrated": dict(to="mqa"),
    "mla": dict(to="mla", kv_lora_rank=16),
    "hybrid": dict(to="hybrid", linear_layers=[1]),
}
LINEAR = {"Qwen3-8B": "gated-deltanet"}
RUNS = {"gqa-same": "exact", "mqa-mean": "runs", "mqa-calibrated": "runs", "mla": "runs", "hybrid": "runs"}
EXPECTED = {name: dict(RUNS) for name in NAMES}
EXPECTED["Qwen2.5-7B"]["mla"] = "runs with --q-bias fit"
EXPECTED["Qwen3-8B"]["mla"] = "runs with --qk-norm fit"  # measured: scripts/experiments/qk_norm_mla.py
EXPECTED["Mistral-7B-v0.1"]["mla"] = "runs with --drop-sliding-window"  # the card says the windows were dropped
EXPECTED["Mistral-7B-v0.1"]["hybrid"] = "runs with --drop-sliding-window"
for name, why in (("Mixtral-8x7B", "MoE blocks"), ("Qwen3-30B-A3B", "MoE blocks"), ("gemma-2-2b", "sandwich norms"),
                  ("gemma-3-1b", "sandwich norms"), ("OLMo-2-1B", "normalises after attention"),
                  ("granite-3.1-2b", "multipliers"), ("Phi-3-mini-128k", "fused qkv_proj")):
    EXPECTED[name]["mla"] = EXPECTED[name]["hybrid"] = f"refused: {why}"
# gemma-3-1b has one KV head already (MQA): --to mqa keeps it, an exact copy whatever the method
EXPECTED["gemma-3-1b"].update({"mqa-mean": "exact", "mqa-calibrated": "exact"})
EXPECTED["OLMo-2-1B"]["mqa-calibrated"] = "refused: --method mean"  # q/k norms over the whole projection


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {n: tiny_from(shrink(real_config(n), layers=LAYERS.get(n, 2)), root / n) for n in NAMES}


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    from kvsurgeon.convert.io.checkpoint import read_config

    impl = attn_impl(read_config(folder))
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl).eval()
    with torch.no_grad():
        return m, m(input_ids=ids).logits


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_every_target_on_real_configs(sources, tmp_path, name, target):
    src, expected = sources[name], EXPECTED[name][target]
    kw = dict(TARGETS[target])
    if target == "gqa-same":
        kw["kv_heads"] = shrink(real_config(name))["num_key_value_heads"]
    if target == "hybrid":
        kw["linear"] = LINEAR.get(name, "mamba2")
    out = tmp_path / "out"
    opts = ConvertOptions(out=out, progress=False, measure="off")
    flag = expected.removeprefix("runs with ")
    if flag != expected:  # refused without the flag, the error naming it; converted with it
        with pytest.raises(KvSurgeonError, match=flag.replace("-", r"\-")):
            run_conversion(str(src), ConversionSpec(calib=CALIB, **kw), opts)
        assert not out.exists()
        name_, *value = flag.split()  # "--q-bias fit", or a switch: "--drop-sliding-window"
        kw[name_.removeprefix("--").replace("-", "_")] = value[0] if value else True
    spec = ConversionSpec(calib=CALIB, **kw)
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
    # min_new_tokens: a random tiny model may pick its EOS id greedily, which ends generation early
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 23)


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


# ---- calibration sees what the model sees --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_calibration_stream_matches_the_model(sources, name):
    """Calibration walks the source one decoder layer at a time; every layer's attention input must be
    what the whole transformers model feeds that layer (embedding scale, each layer type's RoPE, windows,
    eager attention's explicit mask, MoE experts stacked from their stored form)."""
    from kvsurgeon.convert.pipeline.calibration import LayerStream
    from kvsurgeon.convert.io.checkpoint import LazyCheckpoint, read_config

    src = sources[name]
    ids = torch.randint(2, 120, (2, 24), generator=torch.Generator().manual_seed(1))  # 24 > the 8-token windows
    model, _ = _logits(src, ids)
    seen = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, kw["hidden_states"].clone()), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    got = dict(iter(LayerStream(LazyCheckpoint(src), read_config(src), ids)))
    assert sorted(got) == sorted(seen) and len(got) >= 2
    for i in seen:
        torch.testing.assert_close(got[i], seen[i], rtol=1e-4, atol=1e-5, msg=f"{name} layer {i}")


def test_readme_source_table_is_what_these_tests_cover():
    """README's source table is scripts/family_table.py --readme, i.e. EXPECTED above, verbatim."""
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "family_table.py"
    spec = importlib.util.spec_from_file_location("family_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert mod.readme_table() in readme
    assert mod.benchmarks_table() in (Path(__file__).parent.parent / "BENCHMARKS.md").read_text()
