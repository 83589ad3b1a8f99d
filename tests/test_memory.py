"""The uptraining memory floor (convert/train/memory.py): the saved-tensor count it extrapolates is
exact at a length it did not probe, checkpointing is modelled from the per-layer split, and a run whose
floor exceeds the memory available is refused before anything is written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.train import memory as mem
from kvsurgeon.convert.train.distill import distill_loss
from kvsurgeon.convert.train.recipe import recipe_from_dict
from kvsurgeon.convert.train.uptrain import uptrain

from conftest import save_tiny, tiny_config
from test_uptrain import base_recipe


def tiny(attn: str, positions: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(max_position_embeddings=positions), attn_implementation=attn).train()


def step_fn(model):
    def step(n: int) -> torch.Tensor:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        logits = model(input_ids=ids).logits
        return distill_loss(logits, torch.randn(logits.shape), ids)[0]
    return step


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_fit_is_exact_where_it_was_not_probed(attn):
    # eager keeps T x T attention weights for the backward pass: the T^2 term must be there and fitted
    model = tiny(attn, 4096)
    probes = mem.probe(model, step_fn(model), mem.PROBE_LENGTHS)
    at = [mem.quadratic_at(mem.PROBE_LENGTHS, [float(p.total) for p in probes], n) for n in (1536, 2048)]
    got = [mem.probe(model, step_fn(model), (n,))[0] for n in (1536, 2048)]
    assert [g.total for g in got] == pytest.approx(at, rel=1e-9)
    assert got[1].total == got[1].outside + sum(got[1].layers) and len(got[1].layers) == 2
    # per layer too (what checkpointing is modelled from), and each layer's input is T x hidden floats
    assert got[1].layer_inputs == [2048 * 64 * 4] * 2
    if attn == "eager":  # the second difference over 1024, 1536, 2048 is the T^2 term's
        q1024 = mem.quadratic_at(mem.PROBE_LENGTHS, [float(p.total) for p in probes], 1024)
        # exactly one fp32 T x T tensor per head and layer (the softmax output the backward needs)
        assert at[1] - 2 * at[0] + q1024 == pytest.approx(2 * 512**2 * (2 * 8 * 4), rel=1e-9)


def test_checkpointing_floor_is_below_the_plain_one_and_batches_scale():
    model = tiny("eager", 8192)
    probes = mem.probe(model, step_fn(model), mem.PROBE_LENGTHS)
    plain = mem.estimate_step(probes, 8192, 1, 1000, False, mem.PROBE_LENGTHS)
    ckpt = mem.estimate_step(probes, 8192, 1, 1000, True, mem.PROBE_LENGTHS)
    assert plain.optimizer == ckpt.optimizer == 8 * 1000
    # two layers: checkpointing keeps their inputs and recomputes the larger one, instead of both
    assert ckpt.activations < plain.activations
    two = mem.estimate_step(probes, 8192, 2, 1000, False, mem.PROBE_LENGTHS)
    assert 1.9 * plain.activations < two.activations < 2 * plain.activations  # weights' copies do not double


def test_uptrain_refuses_a_step_that_cannot_fit_before_writing(tmp_path, text_file, monkeypatch):
    # the machine's free memory is the one thing replaced: a 1 MB host
    src = save_tiny(tmp_path / "student", max_shard_size="1GB")
    d = base_recipe(tmp_path, text_file, conversion=None, student=str(src), max_steps=1)
    monkeypatch.setattr(mem, "host_memory_available", lambda: 2**20)
    with pytest.raises(KvSurgeonError, match=r"(?s)cannot fit in memory: a step on 32-token windows.*"
                                             r"set gradient_checkpointing: true.*memory_check: false"):
        uptrain(recipe_from_dict(d), progress=False)
    run = tmp_path / "run"
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()

    # the user's override runs it; the floor is recorded
    uptrain(recipe_from_dict(d | {"memory_check": False}), progress=False)
    assert (run / "checkpoints").is_dir()

    # enough for the floor but not twice it: a warning, and the run goes on
    monkeypatch.setattr(mem, "host_memory_available", lambda: None)
    d2 = d | {"output": str(tmp_path / "run2")}
    uptrain(recipe_from_dict(d2), progress=False)
    row = next(r for r in map(json.loads, (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "memory")
    assert row["floor_bytes"] > 0 and row["available_bytes"] is None
    monkeypatch.setattr(mem, "host_memory_available", lambda: int(1.5 * row["floor_bytes"]))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        uptrain(recipe_from_dict(d | {"output": str(tmp_path / "run3")}), progress=False)
    assert any("may run out of memory" in str(x.message) for x in w)
    assert (tmp_path / "run3" / "checkpoints").is_dir()
