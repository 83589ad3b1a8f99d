"""Zero-padding the MLA latent (``--pad-latent-to``, for vLLM's 576-value MLA kernels) is exact:
the float64 layer reference, transformers' logits on a tiny model, and the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from kvsurgeon.attention.families import DictSource, read_attention
from kvsurgeon.attention.mla_layout import pad_latent, scale_latent
from kvsurgeon.convert.pipeline.calibration import CalibConfig
from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.attention.reference import mla_attention_output
from kvsurgeon.convert.mla.fit import convert_layer_to_mla
from kvsurgeon.convert.pipeline.driver import ConvertOptions

from conftest import save_tiny, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(R=24, Dr=16, seed=0):
    m = tiny_model(dtype=torch.float64, seed=seed)
    attn = read_attention(DictSource(m.state_dict()), m.config.to_dict(), 0)
    return convert_layer_to_mla(attn, None, R, Dr, "svd").to(torch.float64)


def test_pad_latent_is_exact_in_float64_with_eps():
    w = _layer()
    x = torch.randn(2, 9, w.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = mla_attention_output(w, x)
    p = pad_latent(w, 560)
    assert (p.kv_lora_rank, p.qk_rope_head_dim) == (560, w.qk_rope_head_dim)
    assert p.kv_a[w.kv_lora_rank:560].abs().max() == 0 and p.kv_b[..., w.kv_lora_rank:].abs().max() == 0
    assert (mla_attention_output(p, x) - ref).abs().max() < 1e-12 * ref.abs().max()
    # the control: rescaling only the norm weight by sqrt(R'/R) is off by the eps term, measurably
    # once eps matters (small latents), which is why the latent rows are scaled instead
    small = x * 1e-4
    naive = pad_latent(w, 560)
    a = (560 / w.kv_lora_rank) ** 0.5
    naive.kv_a[: w.kv_lora_rank] /= a
    naive.kv_a_norm[: w.kv_lora_rank] *= a
    ref_small = mla_attention_output(w, small)
    assert (mla_attention_output(pad_latent(w, 560), small) - ref_small).abs().max() < 1e-10 * ref_small.abs().max()
    assert (mla_attention_output(naive, small) - ref_small).abs().max() > 1e-4 * ref_small.abs().max()


def test_scale_latent_only_shrinks_eps():
    """A latent gain g leaves the attention unchanged except that eps weighs g^2 less: with inputs
    whose latent rms is far above eps nothing changes; with tiny inputs (eps dominant) the scaled
    layer equals the unscaled one at inputs g times larger (RMSNorm is scale-free without eps)."""
    w = _layer()
    x = torch.randn(2, 9, w.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x / (x @ w.kv_a[: w.kv_lora_rank].T).pow(2).mean().sqrt()  # latent rms 1 >> sqrt(eps)
    ref = mla_attention_output(w, x)
    s = scale_latent(w, 100.0)
    assert s.info["latent_gain"] == 100.0 and torch.equal(s.kv_a[w.kv_lora_rank:], w.kv_a[w.kv_lora_rank:])
    assert (mla_attention_output(s, x) - ref).abs().max() < 1e-5 * ref.abs().max()
    tiny = x * 1e-4  # latent rms 1e-4: eps (1e-6) dominates the unscaled norm
    a, b = mla_attention_output(w, tiny), mla_attention_output(s, tiny)
    assert (a - b).abs().max() > 0.1 * a.abs().max()  # eps mattered before ...
    s2 = scale_latent(s, 100.0)  # ... and each further gain of 100 leaves less of it
    assert (mla_attention_output(s2, tiny) - b).abs().max() < (b - a).abs().max()


def test_pad_latent_refuses_to_shrink():
    w = _layer()
    assert pad_latent(w, w.kv_lora_rank) is w
    with pytest.raises(ValueError, match="cannot pad"):
        pad_latent(w, w.kv_lora_rank - 1)


def _convert(src, out, **spec):
    run_conversion(str(src), ConversionSpec(to="mla", method="svd", **spec), ConvertOptions(out=out, progress=False, measure="off"))
    return out


@torch.no_grad()
def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits.double()


def test_padded_checkpoint_logits_match_tiny(tmp_path):
    src = save_tiny(tmp_path / "src")
    plain = _convert(src, tmp_path / "plain", kv_lora_rank=24, rope_dim=16)
    padded = _convert(src, tmp_path / "padded", kv_lora_rank=24, rope_dim=16, pad_latent_to=576)
    cfg = json.loads((padded / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (560, 16)
    assert "zero-padded to 560" in (padded / "README.md").read_text()
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    a, b = _logits(plain, ids), _logits(padded, ids)
    assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
    with pytest.raises(KvSurgeonError, match="smaller than the latent"):
        _convert(src, tmp_path / "bad", kv_lora_rank=24, rope_dim=16, pad_latent_to=32)
    with pytest.raises(KvSurgeonError, match="needs --to mla"):
        ConversionSpec(to="mqa", pad_latent_to=576)


@pytest.mark.real_model
def test_padded_checkpoint_logits_match_smollm2(tmp_path, smollm2):
    plain = _convert(smollm2, tmp_path / "plain", kv_lora_rank=128, rope_dim=64)
    padded = _convert(smollm2, tmp_path / "padded", kv_lora_rank=128, rope_dim=64, pad_latent_to=576)
    ids = torch.randint(2, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    a, b = _logits(plain, ids), _logits(padded, ids)
    # float32 through 30 layers; the padded latent sums 512 instead of 128 squares in the norm
    assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
