"""Kernel choice for uptraining (convert/kernels.py): resolution, the readable error when fused kernels
are demanded but missing, what a run records, and each fused GPU path against the CPU PyTorch path.

The CPU halves always run and can fail: the choice logic, the recorder (including a fake fused package
bound through transformers' own fallback decorator, which ``kernels: torch`` must bypass), and the
PyTorch reference forward/backward of each tiny model (float32 against float64, with a control showing
the tolerance catches a wrong layer). The GPU halves skip only without CUDA; with CUDA and a kernel
package missing they fail with the install command (KVSURGEON_SKIP_FUSED=1 skips them explicitly).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest
import torch

from kvsurgeon.attention.hybrid_layout import granite_hybrid_config, qwen35_text_config
from kvsurgeon.convert.train.kernels import (
    Availability,
    KernelError,
    KernelRecorder,
    _fallback_parts,
    attn_implementation,
    check_fused,
    layer_types_of,
    require_fused,
    resolve,
)

from conftest import tiny_config, widen_matrices, write_tiny_tokenizer

ALL = frozenset({"flash_attn", "fla", "mamba_ssm", "causal_conv1d"})
CPU = Availability(cuda=False, packages=frozenset())
GPU_BARE = Availability(cuda=True, packages=frozenset())
GPU_ALL = Availability(cuda=True, packages=ALL)

# Fused GPU paths run as uptraining runs them (float32 weights, bf16 autocast) against the float32
# CPU PyTorch path: bf16 rounds to ~3 significant digits, so relative errors (Frobenius norm) of
FWD_TOL = 3e-2  # the studied layer's output and the logits
GRAD_TOL = 6e-2  # the gradients of the studied layer's parameters
# The float32 CPU path against float64 on the same weights: agreement to ~1e-6 relative
REF_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- choice logic ------------------------------------------------------------------------------
def test_resolve_and_attention_choice():
    assert resolve("auto", CPU) == "torch" and resolve("torch", GPU_ALL) == "torch"
    assert resolve("auto", GPU_BARE) == "fused" and resolve("fused", GPU_ALL) == "fused"
    with pytest.raises(KernelError, match="needs a CUDA device"):
        resolve("fused", CPU)
    with pytest.raises(KernelError, match="not one of"):
        resolve("flash", CPU)
    assert attn_implementation("auto", CPU) == "sdpa"
    assert attn_implementation("auto", GPU_BARE) == "sdpa"  # no flash-attn: SDPA (torch picks its backend)
    assert attn_implementation("auto", GPU_ALL) == "flash_attention_2"
    assert attn_implementation("torch", GPU_ALL) == "sdpa"


def _granite(layers=(1,)):
    return granite_hybrid_config(tiny_config("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict(), list(layers))


def _qwen35(layers=(1,)):
    return qwen35_text_config(tiny_config("qwen3").to_dict(), list(layers))


def test_layer_types_from_config():
    assert layer_types_of(_granite()) == {"softmax": 1, "mamba2": 1}
    assert layer_types_of(_qwen35([0, 1])) == {"gated_deltanet": 2}
    assert layer_types_of(tiny_config("llama").to_dict()) == {"softmax": 2}


def test_fused_demand_names_what_to_install():
    llama = tiny_config("llama").to_dict()
    require_fused("auto", [_granite()], GPU_BARE)  # auto never demands
    require_fused("fused", [llama, _granite()], GPU_ALL)
    with pytest.raises(KernelError) as e:
        require_fused("fused", [llama, _qwen35()], Availability(True, frozenset({"flash_attn", "causal_conv1d"})))
    msg = str(e.value)
    assert "gated_deltanet layers (1)" in msg and "pip install flash-linear-attention" in msg
    assert "softmax" not in msg.split("installed:")[1].split("install them")[0]  # flash-attn is present
    with pytest.raises(KernelError, match=r"mamba2 layers \(1\).*pip install mamba-ssm causal-conv1d"):
        require_fused("fused", [_granite()], Availability(True, frozenset({"flash_attn", "causal_conv1d"})))
    with pytest.raises(KernelError, match="needs a CUDA device"):
        require_fused("fused", [llama], CPU)


# ---- tiny models: one per layer type -----------------------------------------------------------
def _model(kind: str, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "softmax":
        cfg = tiny_config("llama")
    else:
        d = _granite() if kind == "mamba2" else _qwen35()
        if kind == "mamba2":
            d["mamba_chunk_size"] = 16
        d = dict(d)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return widen_matrices(m).train()


STUDIED = {"softmax": "self_attn", "mamba2": "mamba", "gated_deltanet": "linear_attn"}


def _studied(model, kind):
    """The layer of the studied type: layer 1 (layer 0 stays softmax in the hybrids)."""
    return getattr(model.model.layers[1], STUDIED[kind])


def _forward_backward(model, kind, ids, autocast_dtype=None):
    """Logits, the studied layer's output and its parameters' gradients, from one training step."""
    out = {}
    layer = _studied(model, kind)
    h = layer.register_forward_hook(lambda mod, a, o: out.__setitem__("layer", (o[0] if isinstance(o, tuple) else o)))
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(ids.device.type, enabled=False)
    with ctx:
        logits = model(input_ids=ids).logits
    logits.float().log_softmax(-1).mean().backward()
    h.remove()
    grads = {n: p.grad.detach().float().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), out["layer"].detach().float().cpu(), grads


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids(seq=48, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


@pytest.mark.parametrize("kind", ["softmax", "mamba2", "gated_deltanet"])
def test_cpu_run_records_pytorch_paths(kind):
    """On this machine every layer type reaches PyTorch: the recorder says so from the calls made."""
    m = _model(kind)
    with KernelRecorder(resolve("auto"), [m]) as rec:
        _forward_backward(m, kind, _ids())
    rows = {r.layer_type: r for r in rec.report(m)}
    expect = {"softmax": {"softmax": 2}, "mamba2": {"softmax": 1, "mamba2": 1}, "gated_deltanet": {"softmax": 1, "gated_deltanet": 1}}[kind]
    assert {k: r.layers for k, r in rows.items()} == expect
    assert rows["softmax"].kernel == "sdpa" and not rows["softmax"].fused and rows["softmax"].device == "cpu"
    if kind != "softmax":
        r = rows[kind]
        assert r.kernel == "torch" and not r.fused, r
        # the functions the training forward actually reached (the Mamba2 fused stand-in returns None: not counted)
        want = {"mamba2": {"causal_conv1d_fn", "mamba2_chunk_scan"}, "gated_deltanet": {"causal_conv1d_fn", "torch_chunk_gated_delta_rule"}}[kind]
        assert set(r.calls) == want, r.calls
        with pytest.raises(KernelError, match="ran PyTorch paths"):
            check_fused("fused", list(rows.values()), "student")
        # the shims are gone afterwards: the module holds transformers' own wrappers again
        mod = sys.modules[type(_studied(m, kind)).__module__]
        assert all(_fallback_parts(getattr(mod, f)) is not None for f in r.calls)


FAKE_MODELING = """
import torch
from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

@use_kernel_func_from_hub_with_fallback("fake_rule", "kvs_fake_fused")
def fake_rule(x):
    return x

class FakeGatedDeltaNet(torch.nn.Module):
    def forward(self, x):
        return fake_rule(x)
"""


def test_fake_fused_package_is_recorded_and_torch_mode_bypasses_it():
    """A fused package bound through transformers' own fallback decorator: auto/fused reach it and say so;
    kernels: torch calls the PyTorch function instead (the outputs differ, so the test can tell)."""
    fake = types.ModuleType("kvs_fake_fused")
    exec("def fake_rule(x):\n    return 2 * x\n", fake.__dict__)  # "fused": another result, so which one ran shows
    sys.modules["kvs_fake_fused"] = fake
    mod = types.ModuleType("kvs_fake_modeling")
    sys.modules["kvs_fake_modeling"] = mod
    try:
        exec(compile(FAKE_MODELING, "kvs_fake_modeling", "exec"), mod.__dict__)  # a modeling file, as transformers writes one
        fake_rule = mod.fake_rule
        net = torch.nn.Sequential(mod.FakeGatedDeltaNet(), torch.nn.Linear(2, 2))
        x = torch.ones(2)
        for mode, factor, kernel, fused in (("fused", 2, "kvs_fake_fused", True), ("torch", 1, "torch", False)):
            with KernelRecorder(mode, [net]) as rec:
                y = net[0](x)
            assert torch.equal(y, factor * x), mode
            (row,) = rec.report(net)
            assert (row.layer_type, row.kernel, row.fused, row.calls) == ("gated_deltanet", kernel, fused, {"fake_rule": kernel})
            assert mod.fake_rule is fake_rule  # restored
    finally:
        sys.modules.pop("kvs_fake_fused", None)
        sys.modules.pop("kvs_fake_modeling", None)


# ---- each fused path against the CPU PyTorch path -----------------------------------------------
def _needs_fused(kind):
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: the fused {kind} kernels only run on GPU (the CPU reference path was checked above)")
    if os.environ.get("KVSURGEON_SKIP_FUSED") == "1":
        pytest.skip("KVSURGEON_SKIP_FUSED=1")
    avail = Availability.detect()
    if not avail.has(kind):
        from kvsurgeon.convert.train.kernels import FUSED_PACKAGES

        pytest.fail(f"CUDA is present but the fused {kind} kernels are not installed: {FUSED_PACKAGES[kind][1]} "
                    "(or KVSURGEON_SKIP_FUSED=1 to skip)")


@pytest.mark.parametrize("kind", ["softmax", "mamba2", "gated_deltanet"])
def test_fused_path_matches_cpu_reference(kind):
    ids = _ids()
    ref = _model(kind)
    # CPU half (always): the float32 PyTorch path is the reference; check it against float64 ...
    with KernelRecorder("torch", [ref]):
        logits, layer_out, grads = _forward_backward(ref, kind, ids)
        r64 = copy.deepcopy(ref).double()
        l64, o64, g64 = _forward_backward(r64, kind, ids)
    assert _rel(logits, l64) < REF_TOL and _rel(layer_out, o64) < REF_TOL
    assert grads and all(_rel(grads[n], g64[n]) < REF_TOL for n in grads)
    assert all(g.norm() > 0 for g in grads.values())
    # ... and show the GPU tolerance would catch a wrong layer: a 10% larger output projection of the
    # studied layer moves its output by more than FWD_TOL
    bad = copy.deepcopy(ref)
    with torch.no_grad():
        _studied(bad, kind).o_proj.weight.mul_(1.1) if kind == "softmax" else _studied(bad, kind).out_proj.weight.mul_(1.1)
    with KernelRecorder("torch", [bad]):
        _, bad_out, _ = _forward_backward(bad, kind, ids)
    assert _rel(bad_out, layer_out) > 2 * FWD_TOL

    # GPU half: the same weights on the fused path, as uptraining runs it (fp32 weights, bf16 autocast)
    _needs_fused(kind)
    gpu = _model(kind, attn=attn_implementation("fused"))
    gpu.load_state_dict(ref.state_dict())
    gpu = gpu.cuda()
    with KernelRecorder("fused", [gpu]) as rec:
        g_logits, g_out, g_grads = _forward_backward(gpu, kind, ids.cuda(), autocast_dtype=torch.bfloat16)
    row = {r.layer_type: r for r in rec.report(gpu)}[kind]
    assert row.fused, row
    assert _rel(g_out, layer_out) < FWD_TOL, _rel(g_out, layer_out)
    assert _rel(g_logits, logits) < FWD_TOL, _rel(g_logits, logits)
    for n in grads:
        assert _rel(g_grads[n], grads[n]) < GRAD_TOL, (n, _rel(g_grads[n], grads[n]))


# ---- a run records its kernels in metrics and the card ------------------------------------------
def test_uptrain_records_kernels_in_metrics_and_card(tmp_path, text_file):
    from kvsurgeon.convert.train.recipe import recipe_from_dict
    from kvsurgeon.convert.train.uptrain import uptrain

    from conftest import save_tiny

    src = save_tiny(tmp_path / "src", "llama", max_shard_size="1GB", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    student = tmp_path / "student"
    _model("mamba2").save_pretrained(student)
    write_tiny_tokenizer(student, 128)
    r = recipe_from_dict({
        "source": str(src), "student": str(student), "output": str(tmp_path / "run"),
        "data": {"train": str(text_file), "seq_len": 32, "eval": None},
        "stages": [{"name": "s", "tokens": 64 * 2, "trainable": "new"}],
        "batch_size": 2, "precision": "fp32", "save_every": 10, "kernels": "auto",
    })
    final = uptrain(r, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (k,) = [x for x in rows if x["kind"] == "kernels"]
    assert k["choice"] == "auto" and k["resolved"] == "torch" and k["step"] == 1
    st = {x["layer_type"]: x for x in k["student"]}
    assert st["mamba2"]["kernel"] == "torch" and st["softmax"]["kernel"] == "sdpa" and st["mamba2"]["layers"] == 1
    assert [x["layer_type"] for x in k["teacher"]] == ["softmax"]
    card = (final / "README.md").read_text()
    assert "## Uptraining kernels" in card and "| mamba2 | 1 | torch | no | cpu |" in card


def test_old_recipe_key_names_its_replacement(tmp_path, text_file):
    from kvsurgeon.convert.train.recipe import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="did you mean 'kernels'"):
        recipe_from_dict({"source": "x", "output": "y", "data": {"train": "z"}, "attn_implementation": "auto"})
