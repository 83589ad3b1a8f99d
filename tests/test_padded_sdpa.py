"""Zero-padding MLA's narrower values to the q/k width (convert/padded_sdpa.py) is exact: logits, gradients
and greedy generation match eager attention, the fused CPU kernel is the one that runs, the T x T term
leaves the memory floor, and the checkpoint written is unchanged."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from kvsurgeon.attention.mla_layout import deepseek_config
from kvsurgeon.convert.evaluation.perplexity import load_model
from kvsurgeon.convert.padded_sdpa import NAME, pad_values, register, sdpa_for, values_narrower
from kvsurgeon.convert.train import memory as mem
from kvsurgeon.convert.train.kernels import Availability, attn_implementation

from conftest import tiny_config, widen_matrices
from test_memory import step_fn

FLASH_CPU = "ScaledDotProductFlashAttentionForCpuBackward0"


def mla_config(**kw) -> dict:
    # q/k 16 + 8 wide, v 16: narrower, as our SmolLM2 conversions (96 against 64)
    src = tiny_config(max_position_embeddings=4096).to_dict()
    cfg = deepseek_config(src, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, **kw)
    return {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}


def mla(attn: str, seed: int = 0):
    torch.manual_seed(seed)
    return widen_matrices(DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**mla_config()), attn_implementation=attn, dtype=torch.float32))


def backward_ops(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(f.name())
        stack.extend(g for g, _ in f.next_functions)
    return names


def test_pad_values_is_zero_columns():
    v = torch.randn(2, 3, 5, 4)
    p = pad_values(v, 7)
    assert p.shape == (2, 3, 5, 7) and torch.equal(p[..., :4], v) and not p[..., 4:].any()
    assert pad_values(v, 4) is v


def test_which_configs_get_the_padded_implementation():
    assert values_narrower(mla_config()) and sdpa_for(mla_config()) == NAME
    assert not values_narrower(tiny_config()) and sdpa_for(tiny_config()) == "sdpa"
    same = mla_config()
    same["v_head_dim"] = 24  # as wide as q/k: SDPA's fused kernel runs anyway
    assert not values_narrower(same)
    cpu = Availability(cuda=False, packages=frozenset())
    assert attn_implementation("auto", cpu, DeepseekV3Config(**mla_config())) == NAME
    assert attn_implementation("auto", cpu, tiny_config()) == "sdpa"
    assert attn_implementation("auto", cpu) == "sdpa"


def test_logits_and_gradients_match_eager_and_the_fused_kernel_runs():
    register()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    out, grads = {}, {}
    for attn in ("eager", "sdpa", NAME):
        model = mla(attn).train()
        logits = model(input_ids=ids).logits
        ops = backward_ops(logits)
        # plain SDPA falls back to the math path for v narrower than q/k; padded, the fused kernel runs
        assert (FLASH_CPU in ops) == (attn == NAME), (attn, sorted(o for o in ops if "Attention" in o))
        logits.float().logsumexp(-1).sum().backward()
        out[attn] = logits.detach()
        grads[attn] = {n: p.grad.clone() for n, p in model.named_parameters() if "kv_" in n or "q_proj" in n}
    assert out["eager"].abs().max() > 1  # not a flat model
    torch.testing.assert_close(out[NAME], out["eager"], rtol=1e-5, atol=1e-5)
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads[NAME][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_greedy_generation_with_the_latent_cache_matches_eager():
    register()
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    gen = {}
    for attn in ("eager", NAME):
        model = mla(attn, seed=3).eval()
        gen[attn] = model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(gen[NAME], gen["eager"])


def test_the_t_squared_term_leaves_the_memory_floor():
    register()
    second_diff = {}
    for attn in ("sdpa", NAME):
        model = mla(attn).train()
        probes = mem.probe(model, step_fn(model), mem.PROBE_LENGTHS)
        ys = [float(p.total) for p in probes]
        q = [mem.quadratic_at(mem.PROBE_LENGTHS, ys, n) for n in (1024, 1536, 2048)]
        second_diff[attn] = q[2] - 2 * q[1] + q[0]
    # the math path keeps fp32 T x T scores and probabilities per head and layer; padded, none
    t2 = 2 * 512**2 * (2 * 8 * 4)
    assert second_diff["sdpa"] >= t2
    assert abs(second_diff[NAME]) < 1e-6 * t2


def test_loading_picks_it_and_the_checkpoint_written_is_unchanged(tmp_path):
    folder = tmp_path / "mla"
    mla("eager").save_pretrained(folder)
    model, _ = load_model(str(folder))
    assert model.config._attn_implementation == NAME
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert not any("attn_implementation" in k for k in saved)
    # plain transformers loads it back with its own implementations
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_backward_runs_fused():
    register()
    model = mla(NAME).train()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert FLASH_CPU in backward_ops(logits)
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
