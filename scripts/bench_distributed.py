#!/usr/bin/env python
"""Uptraining on 1 vs 2 processes on this machine: tokens/s and the distinct tokens each run trained on.

The point on a 2-core CPU is correctness and overhead, not speed-up: both runs take the same global
batch (2 windows per step), the 2-process run through accelerate's launcher on gloo, exactly as
tests/test_uptrain_distributed.py starts it. A small random Llama (4 layers, hidden 256) converted
to MQA by mean pooling, trained end to end on pydocs-train text.

    python scripts/bench_distributed.py --steps 24 --seq-len 256

Cost: ~1-2 min on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, TRAIN  # noqa: E402


def build_source(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # the fixture's tokenizer, offline
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def run(base: Path, nproc: int, steps: int, seq: int) -> dict:
    out = base / f"out-{nproc}"
    recipe = {
        "source": str(base / "src"), "output": str(out),
        "conversion": {"to": "mqa", "method": "mean"},
        "data": {"train": str(TRAIN), "seq_len": seq, "eval": None},
        "stages": [{"name": "e2e", "tokens": seq * 2 * steps, "trainable": "all"}],
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "batch_size": 2 // nproc, "precision": "fp32", "save_every": 10 ** 6,
    }
    path = base / f"recipe-{nproc}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "uptrain.py"), "--recipe", str(path)]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "scripts" / "uptrain.py"), "--recipe", str(path)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"distinct_tokens"' in x]
    last = rows[-1]
    steady = [r["tokens_per_s"] for r in rows[len(rows) // 4:]]
    return {"processes": nproc, "threads_per_process": int(env["OMP_NUM_THREADS"]), "tokens": last["tokens"],
            "distinct_tokens": last["distinct_tokens"], "tokens_per_s": round(sum(steady) / len(steady)),
            "final_loss": round(last["loss"], 4), "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        build_source(base / "src")
        rows = [run(base, n, args.steps, args.seq_len) for n in (1, 2)]
    print("| processes | threads each | tokens | distinct tokens | tokens/s (steady) | final loss | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['tokens']:,} | {r['distinct_tokens']:,} | "
              f"{r['tokens_per_s']:,} | {r['final_loss']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
