"""What the two lossy MLA steps of issue 17 cost: Qwen3's per-head q/k RMSNorm (``--qk-norm fit``) and
Qwen2.5's q bias (``--q-bias fit``), each against a control where the exact path exists.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/experiments/qk_norm_mla.py

Tiny models built from the real Qwen3-8B / Qwen2.5-7B configs (tests/real_configs.py: 8 or 14 query
heads, 2 KV heads, head_dim 16), made to see realistic-ish inputs: log-normal per-dim scales with two
outlier dims (as tests/test_qk_norm_merge.py's ``activations``), a low-rank component shared by all tokens,
and a constant offset on the outlier dims (massive activations keep their sign in real LMs).

- layer: layer 0 converted by the plan's own per-layer transform on synthetic inputs (1,024 calibration
  tokens), held-out relative attention-output error vs the source layer;
- end to end: ``kvsurgeon convert`` (Python API, 2,048 calibration tokens of built-in text) on 2-layer
  models whose embeddings and input norms give the same kind of inputs; KL(source || converted) and
  top-1 agreement of next-token distributions on 8 x 64 held-out random token ids.

Controls: Qwen3 -> the same layer with each head's norm frozen at its mean scale (``W * w / mean rms``,
no per-token normalisation: a Llama layer computing nearly the same function, whose MLA path has no norm
to fit), Qwen2.5 -> the same weights with the q bias zeroed. Budgets: full rank (latent = all KV dims, kv_lora_rank
= 2 x 2 x 16 - 16 = 48, rope dim 16: the cache is as large as the source's) and -50% (kv_lora_rank 16).
Prints a markdown table (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import torch  # noqa: E402

import kvsurgeon.attention.reference as ref  # noqa: E402
from kvsurgeon.attention import read_attention  # noqa: E402
from kvsurgeon.convert.io.checkpoint import LazyCheckpoint, read_config  # noqa: E402
from kvsurgeon.convert.mla.fit import linearize_qk_norm  # noqa: E402
from kvsurgeon.convert.mla.plan import MlaTuning, _calibrated_layer, _mla_shape  # noqa: E402
from kvsurgeon.convert.pipeline.calibration import CalibConfig  # noqa: E402
from kvsurgeon.convert.pipeline.driver import ConvertOptions  # noqa: E402
from kvsurgeon.convert.pipeline.spec import ConversionSpec, run_conversion  # noqa: E402
from real_configs import real_config, shrink, tiny_from  # noqa: E402

F64 = torch.float64
DR = 16
BUDGETS = {"full rank": 48, "-50%": 16}  # kv_lora_rank at rope dim 16; cache = R + 16 vs the source's 64
OUTLIERS, RANK, OFFSET = 2, 4, 1.5


def input_profile(hidden: int):
    """Per-dim scales (log-normal, outlier dims x8), the shared low-rank directions and the mean offset."""
    g = torch.Generator().manual_seed(99)
    scale = torch.exp(0.7 * torch.randn(hidden, generator=g))
    scale[:OUTLIERS] *= 8.0
    common = torch.randn(RANK, hidden, generator=g)
    mean = torch.zeros(hidden)
    mean[:OUTLIERS] = OFFSET
    return scale, common, mean


def activations(n: int, T: int, hidden: int, seed: int, offset: bool = True) -> torch.Tensor:
    """Unit-rms attention inputs (n, T, hidden) with the profile above (offset=False: zero-mean, as the tests')."""
    scale, common, mean = input_profile(hidden)
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, T, hidden, generator=g) + (mean if offset else 0)) * scale + torch.randn(n, T, RANK, generator=g) @ common
    return (z / z.pow(2).mean(-1, keepdim=True).sqrt()).to(F64)


def frozen_norm(attn, x):
    """The layer with each head's q/k RMSNorm frozen at its mean scale over x: no norm left to fit."""
    X = x.reshape(-1, x.shape[-1]).double()

    def rows(W, w):
        rms = torch.einsum("ni,hdi->hnd", X, W.double()).pow(2).mean(-1).add(attn.norm_eps).sqrt().mean(1)
        return W.double() * w.double()[None, :, None] / rms[:, None, None]

    return attn.with_(q=rows(attn.q, attn.q_norm), k=rows(attn.k, attn.k_norm), q_norm=None, k_norm=None)


def rel_err(y, y0) -> float:
    return float((y - y0).pow(2).sum() / y0.pow(2).sum())


def layer_row(config: dict, attn, x, held, q_bias: str) -> dict:
    """Held-out attention-output error of the plan's per-layer MLA transform, per budget."""
    y0 = ref.attention_output(attn, held)
    row = {}
    if attn.k_norm is not None:
        lin, info = linearize_qk_norm(attn, x)
        row["norm fit only"] = rel_err(ref.attention_output(lin, held), y0)
        row["k fit err"], row["q fit err"] = info["k_norm_fit_rel_err"], info["q_norm_fit_rel_err"]
        row["rms cv"] = (info["k_rms_cv"], info["q_rms_cv"])
    for name, R in BUDGETS.items():
        shape = _mla_shape(config, R, DR, None)
        w, _ = _calibrated_layer(shape, q_bias, MlaTuning())(0, attn, x)
        row[name] = rel_err(ref.mla_attention_output(w, held), y0)
    return row


def realistic(src: Path, q_bias_zero: bool = False, drop_qk_norm: bool = False) -> Path:
    """Rewrite a tiny model in place so its attention inputs look like ``activations``: embeddings with the
    shared low-rank component and offset, input norms carrying the per-dim scales. Optionally zero the q
    bias, or freeze the q/k norm at its mean scale on random ids (the model becomes a Llama)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from conftest import write_tiny_tokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hidden = m.config.hidden_size
    scale, common, mean = input_profile(hidden)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        E = m.model.embed_tokens.weight
        E.copy_(torch.randn(E.shape, generator=g) + mean + torch.randn(E.shape[0], RANK, generator=g) @ common / scale)
        for layer in m.model.layers:
            layer.input_layernorm.weight.copy_(scale * (1 + 0.1 * torch.randn(hidden, generator=g)))
            if q_bias_zero:
                layer.self_attn.q_proj.bias.zero_()
    if drop_qk_norm:
        rms = {}
        hooks = [mod.register_forward_pre_hook(lambda _, a, n=n: rms.__setitem__(n, a[0].pow(2).mean(-1).add(1e-6).sqrt().mean((0, 1))))
                 for n, mod in m.named_modules() if n.endswith(("q_norm", "k_norm"))]
        with torch.no_grad():
            m(input_ids=torch.randint(2, 120, (8, 64), generator=torch.Generator().manual_seed(11)))
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for i, layer in enumerate(m.model.layers):
                for proj in ("q", "k"):
                    lin, norm = getattr(layer.self_attn, f"{proj}_proj"), getattr(layer.self_attn, f"{proj}_norm")
                    r = rms[f"model.layers.{i}.self_attn.{proj}_norm"]  # (heads,)
                    W = lin.weight.view(r.shape[0], -1, lin.weight.shape[-1])
                    W.mul_(norm.weight[None, :, None] / r[:, None, None])
        cfg = m.config.to_dict()
        keep = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                                    "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id")}
        llama = LlamaForCausalLM(LlamaConfig(**keep, attention_bias=False, hidden_act=cfg["hidden_act"]))
        sd = {k: v for k, v in m.state_dict().items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
        llama.load_state_dict(sd, strict=True)
        m = llama
    m.save_pretrained(src)
    write_tiny_tokenizer(src, m.config.vocab_size)
    return src


def end_to_end(src: Path, out: Path, R: int, **flags) -> tuple[float, float]:
    """KL(source || converted) per token (nats) and top-1 agreement on held-out random ids."""
    from transformers import AutoModelForCausalLM

    spec = ConversionSpec(to="mla", kv_lora_rank=R, rope_dim=DR, calib=CalibConfig(tokens=2048, seq_len=64), **flags)
    run_conversion(str(src), spec, ConvertOptions(out=out, progress=False, measure="off"))
    ids = torch.randint(2, 120, (8, 64), generator=torch.Generator().manual_seed(5))
    lp = []
    for folder in (src, out):
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            lp.append(m(input_ids=ids).logits.double().log_softmax(-1))
    kl = float((lp[0].exp() * (lp[0] - lp[1])).sum(-1).mean())
    top1 = float((lp[0].argmax(-1) == lp[1].argmax(-1)).double().mean())
    return kl, top1


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="qk_norm_mla-"))
    rows = []
    for name, flag, control in (("Qwen3-8B", dict(qk_norm="fit"), "q/k norm frozen at its mean scale"),
                                ("Qwen2.5-7B", dict(q_bias="fit"), "q bias zeroed")):
        cfg = shrink(real_config(name))
        hidden = cfg["hidden_size"]
        x, held = activations(16, 64, hidden, seed=0), activations(4, 64, hidden, seed=1)
        src = tiny_from(cfg, work / name)
        attn = read_attention(LazyCheckpoint(src), read_config(src), 0).to(F64)
        ctrl = frozen_norm(attn, x) if "norm" in control else attn.with_(q_bias=None)
        q_bias = flag.get("q_bias", "refuse")
        for label, a in ((f"{name} ({'--qk-norm fit' if 'qk_norm' in flag else '--q-bias fit'})", attn), (f"control: {control}", ctrl)):
            rows.append((label, "layer", layer_row(cfg, a, x, held, q_bias)))
        if q_bias == "fit":  # the fold x . beta ~= 1 needs a near-constant input direction: without the offset
            xz, hz = activations(16, 64, hidden, seed=0, offset=False), activations(4, 64, hidden, seed=1, offset=False)
            rows.append((f"{name} (--q-bias fit), zero-mean inputs", "layer", layer_row(cfg, attn, xz, hz, q_bias)))
            rows.append((f"control: {control}, zero-mean inputs", "layer", layer_row(cfg, ctrl, xz, hz, q_bias)))
        for label, kw in ((f"{name} ({'--qk-norm fit' if 'qk_norm' in flag else '--q-bias fit'})", {}),
                          (f"control: {control}", {"drop_qk_norm": True} if "norm" in control else {"q_bias_zero": True})):
            s = realistic(tiny_from(cfg, work / f"{name}-{len(rows)}"), **kw)
            row = {}
            for bname, R in BUDGETS.items():
                kl, top1 = end_to_end(s, work / f"out-{len(rows)}-{R}", R, **({} if kw.get("drop_qk_norm") else flag))
                row[bname] = f"KL {kl:.4f}, top-1 {top1:.1%}"
            rows.append((label, "end to end", row))
    print("| source | measured | norm/bias fit only | full rank | -50% |")
    print("|---|---|---|---|---|")
    for label, kind, r in rows:
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else v)
        extra = (f" (normed k fit {r['k fit err']:.4f}, q fit {r['q fit err']:.4f}; pre-norm rms CV k {r['rms cv'][0]:.2f}, "
                 f"q {r['rms cv'][1]:.2f})" if "k fit err" in r else "")
        print(f"| {label} | {kind} | {fmt(r['norm fit only']) + extra if 'norm fit only' in r else '-'} | "
              f"{fmt(r['full rank'])} | {fmt(r['-50%'])} |")


if __name__ == "__main__":
    main()
