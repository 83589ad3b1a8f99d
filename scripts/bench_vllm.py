#!/usr/bin/env python
"""What a conversion buys a vLLM server: the KV-cache capacity vLLM itself reports (tokens, maximum
concurrency at max_model_len) for the same VLLM_CPU_KVCACHE_SPACE, and decode speed after a long
prompt, for the source and each servable conversion. One vLLM process per checkpoint (vLLM logs the
capacity once per process), run in the side venv (scripts/setup_vllm.sh).

    OMP_NUM_THREADS=2 python scripts/bench_vllm.py [--kv-space-gib 2] [--prompt-len 2048] [--new-tokens 64]

Checkpoints: SmolLM2 (GQA 9/3, 30 x 384 values/token) and its MQA (theory 3x); a random Llama with
SmolLM2's depth but 8 KV heads x 64 (1,024 values per layer: MLA's use case) and its MLA 512+64
(theory 1024/576 = 1.78x); SmolLM2's hybrid with half the layers Mamba2 (theory 2x the tokens);
SmolLM2 with 22 or 15 of its 30 layers windowed to 512 tokens (``--to swa``). vLLM budgets a sliding
layer at its window plus one step's ``--max-num-batched-tokens`` (4,096 by default on CPU), so the swa
gain needs a long ``--max-model-len`` and shows fully only with a small step budget:

    python scripts/bench_vllm.py --only smol,smol-swa75,smol-swa50 --max-model-len 8192 --max-num-batched-tokens 512
Goals (issue 15): MQA >= 2.9x the source's tokens, MLA 512+64 >= 1.7x. Takes ~10 min on 2 cores:
run it on an idle machine, the decode numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import ROOT, SOURCE, TRAIN, convert, dump, run_measured, table

sys.path.insert(0, str(ROOT / "tests"))
from vllm_runner import parse_output  # noqa: E402

VENV = Path(os.environ.get("KVSURGEON_VLLM_VENV", Path.home() / ".cache/kvsurgeon/vllm-venv"))
# vLLM-CPU workarounds (BENCHMARKS.md, Engine differences): MLA queries' rope, Mamba2 prefix caching.
# Prefix caching is off for every checkpoint so the timings compare like with like.
COMMON = {"enable_prefix_caching": False}
MLA = {**COMMON, "compilation_config": {"custom_ops": ["-rotary_embedding"]}}


def wide_llama(out: Path) -> Path:
    """A random Llama with SmolLM2's depth and MLP but 8 KV heads x 64 (1,024 cached values per layer)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(SOURCE)
    cfg.update(dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(SOURCE).save_pretrained(out)
    return out


def serve(path: Path, kwargs: dict, args, work: Path) -> dict:
    job = work / f"{path.name}.job.json"
    job.write_text(json.dumps({"models": [{"path": str(path), "prompts": [[1, 2, 3, 4]], "llm_kwargs": kwargs,
                                           "bench": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}}],
                               "max_tokens": 1, "max_model_len": args.max_model_len}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(args.kv_space_gib), VLLM_CPU_OMP_THREADS_BIND="nobind")
    proc = subprocess.run([str(VENV / "bin/python"), str(ROOT / "tests/vllm_runner.py"), str(job)],
                          capture_output=True, text=True, env=env)
    (work / f"{path.name}.vllm.log").write_text(proc.stdout + proc.stderr)
    r = parse_output(proc.stdout)[0]
    if "error" in r:
        raise SystemExit(f"vLLM failed on {path}: {r['error']}")
    return r


def swa_cache_fraction(layers: int, windowed: int, window: int, ctx: int, batched: int) -> float:
    """Per-request cache of a conversion at ``ctx`` tokens as a fraction of its source's, as vLLM budgets
    it: a sliding layer reserves its window plus one scheduling step's tokens (SlidingWindowSpec admission:
    out-of-window blocks are freed only once the step has run), never more than the context."""
    kept = min(window - 1 + batched, ctx)
    return ((layers - windowed) * ctx + windowed * kept) / (layers * ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-space-gib", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="vLLM's per-step token budget (default: vLLM's own); a sliding layer reserves its window plus this")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(CHECKPOINTS)}")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-vllm"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (VENV / ".kvsurgeon-vllm-installed").exists():
        raise SystemExit(f"no vLLM side venv at {VENV}: run `bash scripts/setup_vllm.sh` first")
    keys = list(CHECKPOINTS) if args.only is None else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in keys if k not in CHECKPOINTS]
    if unknown:
        raise SystemExit(f"--only {unknown}: choose from {', '.join(CHECKPOINTS)}")
    extra = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}

    rows, by_key = [], {}
    for key in keys:
        name, build, kwargs, base, theory = CHECKPOINTS[key]
        path = build(out)
        r = serve(Path(path), {**kwargs, **extra}, args, out)
        row = {"checkpoint": name, "tokens": r["kv_cache"]["tokens"], "concurrency": r["kv_cache"]["concurrency"],
               "prefill_s": r["bench"]["prefill_s"], "decode": r["bench"]["decode_tokens_per_s"],
               "max_model_len": args.max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens}
        row["x_tokens"] = row["tokens"] / by_key[base]["tokens"] if base in by_key else 1.0
        row["theory"] = theory(args) if theory else 1.0
        by_key[key] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
    dump(rows, out / "results.json")
    print(table(rows, [("checkpoint", "checkpoint"), ("KV cache tokens", "{tokens:,}"), ("x source", "{x_tokens:.2f}x"),
                       ("x source, theory", "{theory:.2f}x"),
                       (f"max concurrency at {args.max_model_len}", "{concurrency:.2f}x"),
                       (f"prefill {args.prompt_len} tokens (s)", "{prefill_s:.2f}"), ("decode tokens/s", "{decode:.2f}")]))


def _calib() -> list[str]:
    return ["--calib-data", str(TRAIN)] if TRAIN.exists() else []


def _converted(name: str, args: list[str]):
    def build(out: Path) -> Path:
        if not (out / name / "config.json").exists():
            convert([*args, *_calib()], out / name)
        return out / name
    return build


def _smol(out: Path) -> Path:
    from kvsurgeon.convert.io.resolve import resolve_model

    return resolve_model(SOURCE)  # the snapshot folder in the Hub cache


def _wide_mla(out: Path) -> Path:
    wide = wide_llama(out / "wide-llama")
    if not (out / "wide-mla" / "config.json").exists():
        run_measured(["convert", str(wide), "--to", "mla", "--kv-lora-rank", "512", "--rope-dim", "64", "--method", "svd",
                      "--out", str(out / "wide-mla"), "--overwrite"], out / "wide-mla.stats.json")
    return out / "wide-mla"


def _swa_theory(windowed: int):
    def theory(args) -> float:
        batched = args.max_num_batched_tokens or 4096  # vLLM-CPU's default for the LLM class
        return swa_cache_fraction(30, windowed, 512, args.max_model_len, batched)
    return theory


# key -> (table name, builder(out) -> folder, LLM kwargs, key of its source, theory(args) -> x source tokens)
CHECKPOINTS = {
    "smol": ("SmolLM2 source (GQA 9/3)", _smol, COMMON, None, None),
    "smol-mqa": ("SmolLM2 MQA", _converted("smol-mqa", ["--to", "mqa"]), COMMON, "smol", lambda a: 3.0),
    "smol-hybrid50": ("SmolLM2 hybrid 50% Mamba2", _converted(
        "smol-hybrid50", ["--to", "hybrid", "--linear-layers", "even", "--keep-attention", "0.5"]), COMMON, "smol", lambda a: 2.0),
    "smol-swa75": ("SmolLM2 swa, 22 of 30 layers windowed to 512", _converted(
        "smol-swa75", ["--to", "swa", "--window", "512", "--keep-global", "8", "--global-layers", "even"]), COMMON, "smol",
        lambda a: 1 / _swa_theory(22)(a)),
    "smol-swa50": ("SmolLM2 swa, 15 of 30 layers windowed to 512", _converted(
        "smol-swa50", ["--to", "swa", "--window", "512", "--keep-global", "15", "--global-layers", "even"]), COMMON, "smol",
        lambda a: 1 / _swa_theory(15)(a)),
    "wide": ("wide Llama source (8 KV heads x 64)", lambda out: wide_llama(out / "wide-llama"), COMMON, None, None),
    "wide-mla": ("wide Llama MLA 512+64", _wide_mla, MLA, "wide", lambda a: 1024 / 576),
}


if __name__ == "__main__":
    main()
