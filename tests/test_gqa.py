"""MHA/GQA -> GQA/MQA conversion: exact reshuffles are exact, the lossy merge is measured."""

import pytest
import torch
import transformers

import kvsurgeon.attention.reference as ref
from kvsurgeon.attention import DictSource, UnsupportedArchitectureError, family_for, read_attention, write_attention
from kvsurgeon.convert.gqa import merge as gqa
from kvsurgeon.convert.errors import KvSurgeonError

torch.set_num_threads(1)

H, G, D, HIDDEN, LAYERS, VOCAB = 8, 4, 16, 64, 2, 128


def tiny(kind="llama", kv_heads=G, seed=0, std=0.02, dtype=torch.float64):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=H, num_key_value_heads=kv_heads, head_dim=D, max_position_embeddings=256,
        initializer_range=std, tie_word_embeddings=False,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(dtype).eval()
    if kind == "qwen2":  # random q/k/v biases (transformers inits them to zero)
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    return model


def cfg_dict(model):
    return model.config.to_dict()


def read_all(model):
    src = DictSource(model.state_dict())
    return [read_attention(src, cfg_dict(model), i) for i in range(model.config.num_hidden_layers)]


def rebuild(model, attns):
    """A new model of the same class with the converted attention and every other weight copied."""
    cfg = model.config.__class__.from_dict(cfg_dict(model))
    cfg.num_key_value_heads = attns[0].num_kv_heads
    cfg._attn_implementation = model.config._attn_implementation
    new = model.__class__(cfg).to(model.dtype).eval()
    sd = dict(model.state_dict())
    for i, a in enumerate(attns):
        sd.update(write_attention(a, cfg.to_dict(), i))
    new.load_state_dict(sd, strict=True)
    return new


def set_attn(model, attns):
    """Write neutral attention back into the same model (same number of KV heads)."""
    sd = dict(model.state_dict())
    for i, a in enumerate(attns):
        sd.update(write_attention(a, cfg_dict(model), i))
    model.load_state_dict(sd, strict=True)
    return model


def tokens(n=2, T=32, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


@torch.no_grad()
def attention_inputs(model, ids):
    """Per layer: (B, T, hidden) inputs of self_attn (after input_layernorm), source path."""
    xs = [[] for _ in model.model.layers]
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: xs[i].append(kw["hidden_states"].clone()), with_kwargs=True
        )
        for i, layer in enumerate(model.model.layers)
    ]
    model(ids)
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs]


def tie_groups(model, target, values=True):
    """Make the K/V heads (and biases) inside each block of G // target heads identical."""
    r = G // target
    attns = []
    for a in read_all(model):
        def rep(t):
            return None if t is None else t.view(target, r, *t.shape[1:])[:, :1].expand(-1, r, *t.shape[1:]).reshape(t.shape).clone()
        attns.append(a.with_(k=rep(a.k), k_bias=rep(a.k_bias), v=rep(a.v) if values else a.v, v_bias=rep(a.v_bias) if values else a.v_bias))
    return set_attn(model, attns)


def plane_rotate(k, phase, scale):
    """Rotate-half key rows (D, hidden): multiply plane f by scale[f] * exp(i phase[f])."""
    half = k.shape[0] // 2
    re, im = k[:half], k[half:]
    c, s = (scale * phase.cos())[:, None], (scale * phase.sin())[:, None]
    return torch.cat([c * re - s * im, s * re + c * im])


def structured(model, target, noise=0.0, seed=0):
    """Inside each block, every KV head is a per-frequency rotation-scaling of the block's first key
    head and an invertible map of its first value head (plus optional noise): one shared head
    represents the block exactly when noise == 0, while the block mean does not."""
    g = torch.Generator().manual_seed(seed)
    r = G // target
    attns = []
    for a in read_all(model):
        k, v = a.k.clone(), a.v.clone()
        kb = a.k_bias.clone() if a.k_bias is not None else None
        vb = a.v_bias.clone() if a.v_bias is not None else None
        for j in range(G):
            base = (j // r) * r
            if j == base:
                continue
            phase = torch.rand(D // 2, generator=g, dtype=k.dtype) * 6.28
            scale = 0.5 + torch.rand(D // 2, generator=g, dtype=k.dtype)
            k[j] = plane_rotate(k[base], phase, scale)
            if kb is not None:
                kb[j] = plane_rotate(kb[base][:, None], phase, scale)[:, 0]
            M = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=v.dtype))[0] * (0.5 + torch.rand(D, generator=g, dtype=v.dtype))
            v[j] = M @ v[base]
            if vb is not None:
                vb[j] = M @ vb[base]
            if noise:
                k[j] += noise * k[j].std() * torch.randn(k[j].shape, generator=g, dtype=k.dtype)
                v[j] += noise * v[j].std() * torch.randn(v[j].shape, generator=g, dtype=v.dtype)
        attns.append(a.with_(k=k, v=v, k_bias=kb, v_bias=vb))
    return set_attn(model, attns)


def kl(ref_logits, new_logits):
    p = ref_logits.log_softmax(-1)
    return (p.exp() * (p - new_logits.log_softmax(-1))).sum(-1).mean().item()


# ------------------------------------------------------------------------------------------ errors


def test_check_kv_heads_errors():
    with pytest.raises(KvSurgeonError, match="does not divide the 8 query heads.*1, 2, 4, 8"):
        gqa.check_kv_heads(8, 4, 3)
    with pytest.raises(KvSurgeonError, match="more than the model's current 4 KV heads.*expand_to_mha"):
        gqa.check_kv_heads(8, 4, 8)
    with pytest.raises(KvSurgeonError, match="at least 1"):
        gqa.check_kv_heads(8, 4, 0)
    with pytest.raises(KvSurgeonError, match=r"equal size \(6 % 4 != 0\)"):
        gqa.check_kv_heads(12, 6, 4)
    gqa.check_kv_heads(8, 4, 2)  # fine
    model = tiny()
    with pytest.raises(KvSurgeonError, match="does not divide the 8 query heads"):
        gqa.mean_pool(read_all(model)[0], 3)
    with pytest.raises(KvSurgeonError, match="more than"):
        gqa.calibrated_merge(read_all(model)[0], torch.randn(16, HIDDEN), 8)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama.*qwen2"):
        family_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_qk_norm_sources_mean_pool_keeps_the_norms():  # calibrated merging: tests/test_qk_norm_merge.py
    a = read_all(tiny())[0]
    a = a.with_(q_norm=torch.ones(D, dtype=a.q.dtype), k_norm=torch.ones(D, dtype=a.q.dtype))
    assert gqa.mean_pool(a, 2).k_norm is a.k_norm


# ------------------------------------------------------------------------------------------ exact maps


def test_reference_attention_matches_transformers():
    for kind in ("llama", "qwen2"):
        model = tiny(kind, std=0.1)
        ids = tokens()
        xs = attention_inputs(model, ids)
        out = {}
        hook = model.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: out.update(y=o[0]))
        logits(model, ids)
        hook.remove()
        # transformers builds its cos/sin tables in float32: agreement to ~1e-7 in a float64 model
        torch.testing.assert_close(ref.attention_output(read_all(model)[1], xs[1]), out["y"], rtol=1e-5, atol=1e-6)
        assert out["y"].abs().max() > 1e-2


def test_rope_tables_match_transformers_for_scaled_rope():
    from kvsurgeon.attention import rope_spec
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for params in (
        dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192),
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=2048),
    ):
        cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=8192 * 8,
                                       rope_parameters=params)
        emb = LlamaRotaryEmbedding(cfg)
        inv, scale = ref.rope_tables(rope_spec(cfg.to_dict()))
        torch.testing.assert_close(inv.float(), emb.inv_freq)
        assert scale == pytest.approx(emb.attention_scaling)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_mean_pool_of_identical_heads_is_exact(kind):
    model = tie_groups(tiny(kind, std=0.1), target=2)
    ids = tokens()
    pooled = rebuild(model, [gqa.mean_pool(a, 2) for a in read_all(model)])
    assert pooled.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(pooled, ids), logits(model, ids), rtol=1e-9, atol=1e-9)
    if kind == "qwen2":  # the biases were carried (zeroing them changes the logits)
        a = gqa.mean_pool(read_all(model)[0], 2)
        assert a.k_bias.shape == (2, D) and a.v_bias.abs().max() > 0
        unbiased = rebuild(model, [gqa.mean_pool(a, 2).with_(k_bias=None, v_bias=None) for a in read_all(model)])
        assert (logits(unbiased, ids) - logits(model, ids)).abs().max() > 1e-4
    # and heads that differ are not pooled exactly (the test can fail)
    model = tiny(kind, std=0.1)
    pooled = rebuild(model, [gqa.mean_pool(a, 2) for a in read_all(model)])
    assert (logits(pooled, ids) - logits(model, ids)).abs().max() > 1e-4


def test_expand_to_mha_is_exact():
    model = tiny(std=0.1)
    ids = tokens()
    mha = rebuild(model, [gqa.expand_to_mha(a) for a in read_all(model)])
    assert mha.config.num_key_value_heads == H
    torch.testing.assert_close(logits(mha, ids), logits(model, ids), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_permute_heads_is_exact(kind):
    model = tiny(kind, std=0.1)
    ids = tokens()
    order = [2, 0, 3, 1]
    perm = rebuild(model, [gqa.permute_heads(a, order) for a in read_all(model)])
    torch.testing.assert_close(logits(perm, ids), logits(model, ids), rtol=1e-9, atol=1e-9)
    a, b = read_all(model)[0], gqa.permute_heads(read_all(model)[0], order)
    torch.testing.assert_close(b.k[0], a.k[2])
    torch.testing.assert_close(b.q[:2], a.q[4:6])  # query heads 4, 5 read KV head 2
    with pytest.raises(KvSurgeonError, match="permutation"):
        gqa.permute_heads(a, [0, 0, 1, 2])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_calibrated_merge_with_nothing_dropped_is_exact(kind):
    """Target == current KV heads: every per-frequency rotation, pooled non-rotary basis, value basis
    and o refit keeps all components, and the model is unchanged."""
    model = tiny(kind, std=0.1)
    ids = tokens()
    xs = attention_inputs(model, tokens(4, 32, seed=7))
    for nope in (0, 3, None):
        new = rebuild(model, [gqa.calibrated_merge(a, x, G, gqa.MergeOptions(nope_planes=nope)) for a, x in zip(read_all(model), xs)])
        torch.testing.assert_close(logits(new, ids), logits(model, ids), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rope_rotation_merge_is_exact_on_rank1_blocks(kind):
    """Heads that are per-frequency rotation-scalings of one another (keys, biases too) and invertible
    maps of one another (values) merge exactly into one head at the model level: the per-frequency
    complex fit commutes with RoPE and queries/o absorb the coefficients. Mean pooling does not."""
    model = structured(tiny(kind, std=0.1), target=1)
    ids = tokens()
    xs = attention_inputs(model, tokens(4, 32, seed=7))
    attns = read_all(model)
    for refit in (False, True):
        new = rebuild(model, [gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=refit, nope_planes=0)) for a, x in zip(attns, xs)])
        assert new.config.num_key_value_heads == 1
        torch.testing.assert_close(logits(new, ids), logits(model, ids), rtol=1e-7, atol=1e-7)
    mean = rebuild(model, [gqa.mean_pool(a, 1) for a in attns])
    assert (logits(mean, ids) - logits(model, ids)).abs().max() > 1e-3


def test_partial_rotary_tail_is_merged_exactly():
    """Dims past rotary_dim carry no RoPE: the shared tail comes from a plain PCA, exact when the
    heads' tails are invertible maps of one another (checked with the reference attention)."""
    a = read_all(structured(tiny(std=0.1), target=1))[0]
    R = D // 2
    g = torch.Generator().manual_seed(3)
    rope = a.rope.__class__(theta=a.rope.theta, head_dim=D, rotary_dim=R)
    k = a.k.clone()
    for j in range(1, G):  # rotary part: plane rotations of head 0's first R dims; tail: any invertible map
        phase = torch.rand(R // 2, generator=g, dtype=k.dtype) * 6.28
        k[j, :R] = plane_rotate(k[0, :R], phase, torch.ones(R // 2, dtype=k.dtype))
        k[j, R:] = torch.randn(D - R, D - R, generator=g, dtype=k.dtype) @ k[0, R:]
    a = a.with_(k=k, rope=rope)
    x = torch.randn(3, 24, HIDDEN, generator=g, dtype=k.dtype)
    new = gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=False))
    x_eval = torch.randn(2, 24, HIDDEN, generator=g, dtype=k.dtype)
    torch.testing.assert_close(ref.attention_output(new, x_eval), ref.attention_output(a, x_eval), rtol=1e-7, atol=1e-9)


def test_similarity_groups_finds_the_merge_partners():
    """KV heads 0 & 2 and 1 & 3 are identical: grouping by similarity pairs them, after which mean
    pooling is exact; contiguous pooling (0 & 1, 2 & 3) is not."""
    model = tiny(std=0.1)
    attns = []
    for a in read_all(model):
        k, v = a.k.clone(), a.v.clone()
        k[2], v[2], k[3], v[3] = k[0], v[0], k[1], v[1]
        attns.append(a.with_(k=k, v=v))
    model = set_attn(model, attns)
    ids = tokens()
    xs = attention_inputs(model, tokens(4, 32, seed=7))
    orders = []
    for a, x in zip(read_all(model), xs):
        X = x.reshape(-1, HIDDEN)
        keys = torch.einsum("ni,gdi->ngd", X, a.k)
        values = torch.einsum("ni,gdi->ngd", X, a.v)
        orders.append(gqa.similarity_groups(keys, 2, values=values, rotary_dim=D))
    assert orders[0] == [0, 2, 1, 3]
    # the greedy search (used when partitions are too many to enumerate) finds it too
    X = xs[0].reshape(-1, HIDDEN)
    a0 = read_all(model)[0]
    keys, values = torch.einsum("ni,gdi->ngd", X, a0.k), torch.einsum("ni,gdi->ngd", X, a0.v)
    assert gqa.similarity_groups(keys, 2, values=values, rotary_dim=D, max_exhaustive=0) == [0, 2, 1, 3]
    regrouped = rebuild(model, [gqa.mean_pool(gqa.permute_heads(a, o), 2) for a, o in zip(read_all(model), orders)])
    torch.testing.assert_close(logits(regrouped, ids), logits(model, ids), rtol=1e-9, atol=1e-9)
    contiguous = rebuild(model, [gqa.mean_pool(a, 2) for a in read_all(model)])
    assert (logits(contiguous, ids) - logits(model, ids)).abs().max() > 1e-4
    # calibrated_merge regroups on its own
    new = rebuild(model, [gqa.calibrated_merge(a, x, 2) for a, x in zip(read_all(model), xs)])
    torch.testing.assert_close(logits(new, ids), logits(model, ids), rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------------------ lossy, measured


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_calibrated_merge_beats_mean_pooling(kind):
    """Random-but-structured heads (related by rotations/maps plus 30% noise), 4 KV heads -> 1: the
    calibrated merge's KL to the source on held-out tokens is well below mean pooling's, and each
    piece (keys, values, o refit) is measured to help. The o refit has H * Dv = 128 inputs per
    output here and needs tokens well beyond that: with 1024 calibration tokens it overfits."""
    model = structured(tiny(kind, std=0.15, seed=2), target=1, noise=0.3, seed=5)
    calib_ids, eval_ids = tokens(64, 64, seed=11), tokens(4, 64, seed=12)
    xs = attention_inputs(model, calib_ids)
    attns = read_all(model)
    ref = logits(model, eval_ids)

    def score(fn):
        return kl(ref, logits(rebuild(model, [fn(a, x) for a, x in zip(attns, xs)]), eval_ids))

    mean = score(lambda a, x: gqa.mean_pool(a, 1))
    keys = score(lambda a, x: gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(values="mean", refit=False)))
    kv = score(lambda a, x: gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=False)))
    full = score(lambda a, x: gqa.calibrated_merge(a, x, 1))
    assert mean > 1e-2  # the source is far from its mean-pooled version
    assert keys < mean and kv < 0.5 * keys and full < kv, (mean, keys, kv, full)
    # KL to the source, pinned: measured 2026-12-01 (float64, one thread; deterministic)
    #   llama: mean 1.283, keys 1.173, keys+values 0.198, + o refit 0.186
    #   qwen2: mean 1.100, keys 0.981, keys+values 0.0434, + o refit 0.0427
    # Bounds: measured x 1.05 (each piece), not only "below 0.2 x mean pooling".
    pinned = {"llama": (1.173, 0.198, 0.186), "qwen2": (0.981, 0.0434, 0.0427)}[kind]
    for got, want in zip((keys, kv, full), pinned):
        assert got < want * 1.05, (kind, keys, kv, full)


def test_nope_planes_auto_picks_by_calibration_error():
    a = read_all(structured(tiny(std=0.15, seed=2), target=1, noise=0.3, seed=5))[1]
    x = attention_inputs(tiny(std=0.15, seed=2), tokens(8, 64, seed=11))[1]
    info = {}
    gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=False), info=info)
    errs = info["nope_errors"]
    assert list(errs) == gqa.nope_candidates(a.rope, 64) and len(errs) > 1
    assert info["nope_planes"] == min(errs, key=errs.get)


def test_nope_planes_auto_judges_candidates_at_the_served_distances():
    """With a context past the window, each candidate's error is the mean of its relative attention-output
    error on the window and on the same tokens with RoPE frequencies stretched by ceil(context / T), so
    distances reach the context; recomputed here from merges with the count fixed (no refit: the choice
    is made before it)."""
    a = read_all(structured(tiny(std=0.15, seed=2), target=1, noise=0.3, seed=5))[1]
    x = attention_inputs(tiny(std=0.15, seed=2), tokens(8, 64, seed=11))[1]
    info = {}
    gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=False, context=500), info=info)
    assert info["nope_stretch"] == 8 == gqa.distance_stretch(500, 64)
    errs = info["nope_errors"]
    assert list(errs) == gqa.nope_candidates(a.rope, 500) and len(errs) > 2
    inv = ref.rope_tables(a.rope)[0]

    def rel(m, **kw):
        y = ref.attention_output(a, x, **kw)
        return float((ref.attention_output(m, x, **kw) - y).pow(2).sum() / y.pow(2).sum())

    for n, got in errs.items():
        m = gqa.calibrated_merge(a, x, 1, gqa.MergeOptions(refit=False, nope_planes=n))
        far = rel(m, inv_freq=inv * 8, attention_scaling=1.0)
        assert got == pytest.approx((rel(m) + far) / 2, rel=1e-9), n
        assert far > rel(m) or n == 0  # the stretch is felt: pooled planes err more at long distances
    assert info["nope_planes"] == min(errs, key=errs.get)


def _head_errors(a, m, x, kv_order):
    """Each source query head's squared output error through its own o columns, over the tokens; the
    merge ``m`` has its heads in ``kv_order`` (its ``info["kv_order"]``)."""
    a = gqa.permute_heads(a, kv_order)
    back = torch.argsort(gqa._query_order(kv_order, a.group_size))
    z, zm = ref.head_outputs(a, x)[..., back, :], ref.head_outputs(m, x)[..., back, :]
    a, m = a.with_(o=a.o[:, back]), m.with_(o=m.o[:, back])
    o, om = a.o.double(), m.o.double()
    return torch.stack([((z[..., h, :] @ o[:, h].T) - (zm[..., h, :] @ om[:, h].T)).pow(2).sum() for h in range(a.num_heads)])


@pytest.mark.parametrize("target", [1, 2])
def test_head_weights_favour_the_weighted_head(target):
    """head_weights counts one query head's errors 100 times in the key and value fits: that head's own
    output error falls below 0.6x of the unweighted merge's, and below what it is when another source KV
    head's query head is weighted instead. With 2 target heads the KV heads are regrouped first, and each
    weight must follow its head. All-ones weights are the unweighted merge exactly."""
    a = read_all(structured(tiny(std=0.15, seed=2), target=1, noise=0.3, seed=5))[1]
    x = attention_inputs(tiny(std=0.15, seed=2), tokens(8, 64, seed=11))[1]
    opts = gqa.MergeOptions(refit=False, nope_planes=0)
    info = {}
    plain = gqa.calibrated_merge(a, x, target, opts, info=info)
    assert (info["kv_order"] != list(range(G))) == (target == 2)  # the regrouping this test needs
    ones = gqa.calibrated_merge(a, x, target, opts, head_weights=torch.ones(H))
    assert all(torch.equal(getattr(plain, n), getattr(ones, n)) for n in ("q", "k", "v", "o"))
    before = _head_errors(a, plain, x, info["kv_order"])
    errs = {}
    for h in (0, 5):  # source KV heads 0 and 2
        w = torch.ones(H)
        w[h] = 100.0
        errs[h] = _head_errors(a, gqa.calibrated_merge(a, x, target, opts, head_weights=w), x, info["kv_order"])
        assert errs[h][h] < 0.6 * before[h], (h, errs[h][h] / before[h])
    assert errs[0][0] < errs[5][0] and errs[5][5] < errs[0][5]


def test_attention_stats_by_row_blocks_match_the_full_probabilities():
    """The calibrated merge's per-token statistics (score sensitivity, attention received) are accumulated
    over blocks of query rows; past ``ROW_BLOCK`` tokens they equal the same sums over the full (H, T, T)
    probabilities, biases included."""
    attn = read_all(tiny("qwen2"))[1]
    B, T = 2, ref.ROW_BLOCK + 88
    x = torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    key_w, recv = gqa._attention_stats(attn, x)
    o = attn.o.double()
    M = torch.einsum("ihv,ihw->hvw", o, o)
    want_w, want_r = [], []
    for b in range(B):
        p = ref.source_probs(attn, x[b])  # (H, T, T)
        v = ref._values(attn, x[b])[attn.kv_index()]
        z = p @ v
        d = v[:, None, :, :] - z[:, :, None, :]  # (H, t, s, Dv): v(s) - z(t)
        want_w.append((p * torch.einsum("htsv,hvw,htsw->hts", d, M, d)).sum(1).T)
        want_r.append(p.sum(1).T)
    assert float(p[:, ref.ROW_BLOCK:, :ref.ROW_BLOCK].sum()) > 1.0  # later blocks do attend to earlier ones
    torch.testing.assert_close(key_w, torch.cat(want_w), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(recv, torch.cat(want_r), rtol=1e-10, atol=1e-12)


def _convert_mqa(src, out, text_file, **spec_kw):
    from kvsurgeon.convert.pipeline.driver import ConvertOptions
    from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion

    spec = ConversionSpec(to="mqa", calib_data=str(text_file), calib_tokens=256, calib_seq_len=64, **spec_kw)
    return run_conversion(str(src), spec, ConvertOptions(out=out, measure="off", progress=False))


def _state(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _spec_equals_plan(src, tmp_path, text_file, merge, **spec_kw):
    """Converts ``src`` by the CLI spec (``spec_kw``, into tmp_path/spec) and by convert_model on
    gqa_plan(merge=merge) (tmp_path/direct); asserts the two bit-identical and returns the spec's tensors."""
    from kvsurgeon.convert.gqa.plan import gqa_plan
    from kvsurgeon.convert.pipeline.calibration import CalibConfig
    from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model

    _convert_mqa(src, tmp_path / "spec", text_file, **spec_kw)
    calib = CalibConfig(data=str(text_file), tokens=256, seq_len=64)
    convert_model(str(src), gqa_plan(1, merge=merge), ConvertOptions(out=tmp_path / "direct", calib=calib, measure="off", progress=False))
    spec, direct = _state(tmp_path / "spec"), _state(tmp_path / "direct")
    assert spec.keys() == direct.keys()
    for name in spec:
        torch.testing.assert_close(spec[name], direct[name], rtol=0, atol=0)
    return spec


def test_pooled_rope_planes_option_reaches_the_merge(tmp_path, text_file):
    """--pooled-rope-planes N is the calibrated merge's nope_planes: the CLI spec's output equals
    convert_model on gqa_plan(merge=MergeOptions(nope_planes=N)), and another N gives other keys."""
    from conftest import save_tiny

    src = save_tiny(tmp_path / "src")
    p0 = _spec_equals_plan(src, tmp_path, text_file, gqa.MergeOptions(nope_planes=0), pooled_rope_planes=0)
    _convert_mqa(src, tmp_path / "p3", text_file, pooled_rope_planes=3)
    p3 = _state(tmp_path / "p3")
    k = "model.layers.0.self_attn.k_proj.weight"
    assert p0[k].shape[0] == D and (p0[k] - p3[k]).abs().max() > 1e-3
    assert "--pooled-rope-planes 0" in (tmp_path / "spec" / "README.md").read_text()


def test_gqa_plan_judges_pooled_planes_at_the_sources_context(tmp_path, text_file):
    """By default the plan passes the source's max_position_embeddings as the merge's context: its output
    equals an explicit MergeOptions(context=max_position_embeddings), tensor for tensor."""
    import json

    from conftest import save_tiny
    from kvsurgeon.convert.gqa.plan import gqa_plan
    from kvsurgeon.convert.pipeline.calibration import CalibConfig
    from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model

    src = save_tiny(tmp_path / "src")
    ctx = json.loads((src / "config.json").read_text())["max_position_embeddings"]
    assert ctx > 64  # past the calibration window, so the stretch applies
    calib = CalibConfig(data=str(text_file), tokens=256, seq_len=64)
    for name, merge in (("default", gqa.MergeOptions()), ("explicit", gqa.MergeOptions(context=ctx))):
        convert_model(str(src), gqa_plan(1, merge=merge), ConvertOptions(out=tmp_path / name, calib=calib, measure="off", progress=False))
    default, explicit = _state(tmp_path / "default"), _state(tmp_path / "explicit")
    assert default.keys() == explicit.keys()
    for name in default:
        torch.testing.assert_close(default[name], explicit[name], rtol=0, atol=0)


def test_serve_context_reaches_the_merge(tmp_path, text_file):
    """--serve-context N is the calibrated merge's context: the CLI spec's output equals convert_model on
    gqa_plan(merge=MergeOptions(context=N)), tensor for tensor, and differs from the default (the source's
    max_position_embeddings), so a spec that dropped the option would fail here."""
    from conftest import save_tiny

    src = save_tiny(tmp_path / "src")  # max_position_embeddings 256, calibration windows of 64
    short = _spec_equals_plan(src, tmp_path, text_file, gqa.MergeOptions(context=64), serve_context=64)
    _convert_mqa(src, tmp_path / "default", text_file)
    default = _state(tmp_path / "default")
    assert max(float((short[n].double() - default[n].double()).abs().max()) for n in short if "k_proj" in n) > 1e-4
    assert "--serve-context 64" in (tmp_path / "spec" / "README.md").read_text()


@pytest.mark.parametrize("option, too_far, limit, on_qwen3", [
    # the tiny source: head_dim 16 (8 RoPE planes), max_position_embeddings 256
    ("pooled_rope_planes", 9, "more than the 8 RoPE planes per head of this source; use 0-8", 0),
    ("serve_context", 257, r"--serve-context 257 is beyond the source's max_position_embeddings \(256\); use at most 256", 128),
])
def test_plane_pooling_options_refused_before_writing(tmp_path, text_file, option, too_far, limit, on_qwen3):
    """--pooled-rope-planes past the source's planes, --serve-context past its max_position_embeddings, and
    either on a source whose keys pass a per-head norm (Qwen3: merged after the norm, no plane pooling) are
    refused naming the limit, and nothing is written."""
    from conftest import save_tiny
    from kvsurgeon.convert.pipeline.preflight import PreflightError

    src = save_tiny(tmp_path / "src")
    with pytest.raises(PreflightError, match=limit):
        _convert_mqa(src, tmp_path / "out", text_file, **{option: too_far})
    assert not (tmp_path / "out").exists()
    qwen3 = save_tiny(tmp_path / "qwen3", "qwen3")
    with pytest.raises(PreflightError, match=f"--{option.replace('_', '-')} does not apply to qwen3"):
        _convert_mqa(qwen3, tmp_path / "out", text_file, **{option: on_qwen3})
    assert not (tmp_path / "out").exists()
