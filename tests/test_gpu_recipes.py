"""GPU recipes state their hardware, tokens and time, and the numbers add up: tokens = the stages'
sum, FLOPs/token = convert/estimate.py's model on the source's stored config, hours = tokens x
FLOPs/token / (GPUs x peak x assumed utilisation); all marked estimated, not measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsurgeon.convert.train.estimate import REL_TOL, HardwareCfg, training_flops_per_token
from kvsurgeon.convert.train.recipe import RecipeError, load_recipe, recipe_from_dict

from real_configs import HUB_IDS, real_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if "GPU-sized" in p.read_text()]


def test_gpu_recipes_found():
    assert {p.name for p in GPU_RECIPES} >= {"llama3-8b-mla.yaml", "qwen3-hybrid.yaml"}


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_states_consistent_estimate(path):
    r, _ = load_recipe(path)  # validation checks tokens and hours against the stated assumptions
    hw = r.hardware
    assert hw is not None, f"{path.name}: a GPU recipe needs a hardware: block"
    assert not hw.measured
    by_id = {v: k for k, v in HUB_IDS.items()}
    cfg = real_config(by_id[r.source])
    frac = r.conversion.keep_attention if r.conversion and r.conversion.to == "hybrid" else 1.0
    want = training_flops_per_token(cfg, r.data.seq_len, frac, r.gradient_checkpointing)
    assert abs(hw.flops_per_token - want) <= REL_TOL * want, (hw.flops_per_token, want)
    header = "".join(l for l in path.read_text().splitlines(keepends=True) if l.startswith("#"))
    assert "ESTIMATED, NOT MEASURED" in header
    assert f"~{hw.estimated_hours:.1f} h" in header and hw.gpu in header and f"{hw.gpus} x" in header
    assert r.kernels == "auto"


def test_inconsistent_hardware_is_refused(tmp_path):
    base = {"source": "s", "output": "o", "student": "st", "data": {"train": "t", "seq_len": 8},
            "stages": [{"tokens": 1000}],
            "hardware": {"gpus": 1, "gpu": "G", "peak_tflops": 100, "mfu": 0.5, "tokens": 1000,
                         "flops_per_token": 1.8e14, "estimated_hours": 1.0}}
    assert recipe_from_dict(base).hardware.hours() == pytest.approx(1.0)
    for change, msg in ((("tokens", 2000), "stages sum to 1,000"), (("estimated_hours", 2.0), "= 1.00 h"),
                        (("measured", True), "needs a measured run"), (("mfu", 0), "required")):
        bad = {**base, "hardware": {**base["hardware"], change[0]: change[1]}}
        with pytest.raises(RecipeError, match=msg):
            recipe_from_dict(bad)
