"""Retrieval heads in the calibrated fits: the far repeats found in calibration text, each head's copy
attention on them, and ``--retrieval-heads`` reaching the KV-head merge and MLA's latent fit."""

import json

import pytest
import torch

import kvsurgeon.attention.reference as ref
from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.retrieval_heads import copy_scores, repeat_pairs, retrieval_head_weights

from test_gqa import HIDDEN, _state, read_all, tiny

CALIB = dict(calib_tokens=512, calib_seq_len=128)  # windows long enough for repeats 64+ tokens back


def test_repeat_pairs_finds_the_nearest_far_bigram():
    """Row t pairs with s when ids[s-1:s+1] == ids[t:t+2] and t - s >= far, the nearest such s; a repeat
    closer than ``far`` is no copy from far back, and windows are searched separately."""
    far = 8
    row = [1, 2] + [9] * 10 + [1, 2] + [7] * 3 + [1, 2] + [5] * 4
    # the bigram (1, 2) ends at 1, 13 and 18; the rows predicting its repeats are t = 12 and t = 17, and
    # for t = 17 the repeat ending at 13 is only 4 back: both pair with s = 1. No other bigram recurs 8+ back.
    ids = torch.tensor([row, [3] * len(row)])
    pairs = repeat_pairs(ids, far=far).tolist()
    assert [p for p in pairs if p[0] == 0] == [[0, 12, 1], [0, 17, 1]]
    # window 1 is one token repeated: every row t >= far + 1 pairs with the nearest s = t - far
    assert [[b, t, s] for b, t, s in pairs if b == 1] == [[1, t, t - far] for t in range(far + 1, len(row) - 1)]
    assert repeat_pairs(torch.arange(40)[None], far=far).shape == (0, 3)  # no repeats, no pairs


def test_copy_scores_are_the_attention_on_each_pair():
    """Each head's copy score is its full causal softmax probability a(t, s) averaged over the pairs, biases
    included, though scored by blocks of query rows (pairs here on both sides of ``ROW_BLOCK``)."""
    attn = read_all(tiny("qwen2"))[1]
    B, T = 2, ref.ROW_BLOCK + 88
    x = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(1, T, (40,), generator=g)
    cols = (torch.rand(40, generator=g, dtype=torch.float64) * rows).long()
    pairs = torch.stack([torch.arange(40) % B, rows, cols], 1)
    assert (rows >= ref.ROW_BLOCK).any() and (rows < ref.ROW_BLOCK).any()
    want = torch.stack([ref.source_probs(attn, x[b])[:, t, s] for b, t, s in pairs.tolist()]).mean(0)
    torch.testing.assert_close(copy_scores(attn, x, pairs), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(copy_scores(attn, x, pairs[:0]), torch.zeros(attn.num_heads, dtype=torch.float64))
    assert torch.equal(retrieval_head_weights(torch.tensor([0.0, 0.5]), 10.0), torch.tensor([1.0, 6.0]))


TARGETS = {  # spec options, and a tensor the weighting moves
    "mqa": (dict(to="mqa"), "k_proj"),
    "mla": (dict(to="mla", kv_lora_rank=16, rope_dim=8), "kv_a_proj"),
}


def _plan(target: str, weight: float):
    """The plan the spec of TARGETS[target] makes, built directly."""
    from kvsurgeon.convert.gqa.plan import gqa_plan
    from kvsurgeon.convert.mla.plan import mla_plan

    return gqa_plan(1, retrieval_weight=weight) if target == "mqa" else mla_plan(16, 8, retrieval_weight=weight)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_retrieval_heads_option_reaches_the_fit(tmp_path, text_file, target):
    """--retrieval-heads W: the output equals convert_model on the target's plan with retrieval_weight=W,
    tensor for tensor; it differs from W=0 (every head alike); the copy scores are written beside the
    model, one per query head and layer, from the far repeats of the calibration windows; the card names
    the option."""
    from conftest import save_tiny
    from kvsurgeon.convert.retrieval_heads import HEADS_FILE
    from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model
    from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion

    spec_kw, moved = TARGETS[target]
    src = save_tiny(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())

    def spec(w):
        return ConversionSpec(**spec_kw, calib_data=str(text_file), retrieval_heads=w, **CALIB)

    run_conversion(str(src), spec(200.0), ConvertOptions(out=tmp_path / "w", measure="off", progress=False))
    convert_model(str(src), _plan(target, 200.0),
                  ConvertOptions(out=tmp_path / "direct", calib=spec(200.0).calib_config(), measure="off", progress=False))
    run_conversion(str(src), spec(0.0), ConvertOptions(out=tmp_path / "off", measure="off", progress=False))
    w, direct, off = _state(tmp_path / "w"), _state(tmp_path / "direct"), _state(tmp_path / "off")
    assert w.keys() == direct.keys() == off.keys()
    for name in w:
        torch.testing.assert_close(w[name], direct[name], rtol=0, atol=0)
    assert max(float((w[n].double() - off[n].double()).abs().max()) for n in w if moved in n) > 1e-4
    heads = json.loads((tmp_path / "w" / HEADS_FILE).read_text())
    assert heads["retrieval_weight"] == 200.0 and heads["copies"] > 50
    scores = heads["copy_scores"]
    assert sorted(map(int, scores)) == list(range(cfg["num_hidden_layers"]))
    assert all(len(s) == cfg["num_attention_heads"] and all(0 <= v <= 1 for v in s) for s in scores.values())
    assert max(max(s) for s in scores.values()) > 0.01
    assert not (tmp_path / "off" / HEADS_FILE).exists()
    card = (tmp_path / "w" / "README.md").read_text()
    assert "--retrieval-heads 200" in card and "weighted by 1 + 200 x their copy attention" in card


def test_token_heads_reach_mla_token_weights(tmp_path, text_file):
    """MlaTuning.token_heads: with --retrieval-heads, MLA's token weights count each head's attention by its head
    weight too (the sum itself is pinned in test_mla), so the fitted latent moves; without it they do not."""
    from conftest import save_tiny
    from kvsurgeon.convert.mla.plan import MlaTuning, mla_plan
    from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model
    from kvsurgeon.convert.pipeline.spec import ConversionSpec

    src = save_tiny(tmp_path / "src")
    calib = ConversionSpec(to="mla", kv_lora_rank=16, rope_dim=8, calib_data=str(text_file), **CALIB).calib_config()
    for name, tuning in (("plain", MlaTuning()), ("th", MlaTuning(token_heads=True))):
        convert_model(str(src), mla_plan(16, 8, retrieval_weight=200.0, tuning=tuning),
                      ConvertOptions(out=tmp_path / name, calib=calib, measure="off", progress=False))
    plain, th = _state(tmp_path / "plain"), _state(tmp_path / "th")
    assert max(float((plain[n].double() - th[n].double()).abs().max()) for n in plain if "kv_a_proj" in n) > 1e-4


@pytest.mark.parametrize("spec_kw, message", [
    (dict(to="hybrid", keep_attention=1, retrieval_heads=5.0), "--retrieval-heads weighs the query heads in a calibrated fit"),
    (dict(to="mla", kv_lora_rank=8, method="svd", retrieval_heads=5.0), "with the calibrated method, not --method svd"),
    (dict(to="mqa", method="mean", retrieval_heads=5.0), "with the calibrated method, not --method mean"),
    (dict(to="mqa", retrieval_heads=-1.0), "--retrieval-heads must be a number >= 0"),
    (dict(to="mqa", retrieval_heads=float("nan")), "--retrieval-heads must be a number >= 0"),
])
def test_retrieval_heads_refused_where_it_has_no_meaning(spec_kw, message):
    from kvsurgeon.convert.pipeline.spec import ConversionSpec

    with pytest.raises(KvSurgeonError, match=message):
        ConversionSpec(**spec_kw)
