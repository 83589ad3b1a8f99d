#!/usr/bin/env python
"""Convert a model bigger than comfortable memory: a random-weight checkpoint with Llama-3-8B's
shapes (32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, vocab
128256, bf16, 4 shards, ~16 GB), built once and cached.

For each conversion it records wall time, peak RSS, bytes read and written (from /proc/self/io
of the converting process), and in the same run the time of `cp -r` of the same checkpoint, the
I/O floor. Outputs are deleted after measuring to keep the disk bounded.

    python scripts/bench_scale.py                       # all four conversions
    python scripts/bench_scale.py --only mqa-mean       # one of them
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from bench_common import run_measured

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    # Llama-3.1-8B's shipped rope: llama3 scaling, so the MLA jobs keep every rotary dim (Dr = 128)
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
}
JOBS = {
    "mqa-mean": ["--to", "mqa", "--method", "mean"],
    "mqa-calibrated": ["--to", "mqa", "--method", "calibrated", "--calib-tokens", "512", "--calib-seq-len", "256"],
    "mla-svd": ["--to", "mla", "--method", "svd", "--kv-lora-rank", "448", "--rope-dim", "128"],
    "mla-calibrated": ["--to", "mla", "--method", "calibrated", "--kv-lora-rank", "448", "--rope-dim", "128",
                       "--calib-tokens", "512", "--calib-seq-len", "256"],
}


def build(folder: Path) -> None:
    """Write the random checkpoint layer by layer (bounded memory), plus a real tokenizer."""
    from kvsurgeon.convert.pipeline.driver import planned_tensors
    from kvsurgeon.convert.io.resolve import resolve_model
    from kvsurgeon.convert.io.safetensors_io import PlannedShardWriter
    from kvsurgeon.convert.io.writer import atomic_output, copy_extras, write_json

    specs, _ = planned_tensors(CONFIG, torch.bfloat16)
    total = sum(s.nbytes for s in specs)
    g = torch.Generator().manual_seed(0)
    with atomic_output(folder) as tmp:
        # 8% slack so greedy packing of ~0.1-1 GB tensors ends in exactly 4 shards
        w = PlannedShardWriter(tmp, specs, int(total / 4 * 1.08), metadata={"built_by": "kvsurgeon bench_scale"})
        for s in specs:
            if s.name.endswith("norm.weight"):
                t = torch.ones(s.shape)
            else:
                t = torch.empty(s.shape).normal_(0, 0.02, generator=g)
            w.write(s.name, t)
            del t
        w.finish()
        write_json(tmp / "config.json", CONFIG)
        # Any tokenizer whose ids fit the vocab serves calibration: reuse the real SmolLM2 one.
        copy_extras(resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct"), tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench-scale"), help="where the checkpoint and outputs go")
    ap.add_argument("--only", choices=sorted(JOBS), action="append")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = Path(args.dir)
    src = base / "llama3-8b-random"
    if not (src / "config.json").is_file():
        t0 = time.time()
        print(f"building {src} (once) ...", flush=True)
        build(src)
        print(f"built in {time.time() - t0:.0f}s", flush=True)
    size = folder_bytes(src)
    print(f"source: {src} ({size / 1e9:.2f} GB, {len(list(src.glob('*.safetensors')))} shards)", flush=True)

    rows = []
    copy = base / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    t0 = time.time()
    subprocess.run(["cp", "-r", str(src), str(copy)], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.time() - t0
    shutil.rmtree(copy)
    rows.append(("cp -r (I/O floor)", cp_s, None, size, size))
    print(f"cp -r: {cp_s:.1f}s", flush=True)

    for name in args.only or list(JOBS):
        out = base / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["convert", str(src), *JOBS[name], "--out", str(out), "--measure", "off"]  # time and memory of the conversion alone
        print(f"{name}: kvsurgeon {' '.join(argv)}", flush=True)
        t0 = time.time()
        st = run_measured(argv, base / f"{name}.json")
        subprocess.run(["sync"], check=True)
        wall = time.time() - t0
        rows.append((name, wall, st["peak_rss_bytes"], st["read_bytes"], st["written_bytes"]))
        print(f"  {wall:.1f}s, peak RSS {st['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    print()
    print(f"| conversion | wall s | x cp | peak RSS GB (GiB) | read GB | written GB |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for name, s, rss, rd, wr in rows:
        rss_s = f"{rss / 1e9:.2f} ({rss / 2**30:.2f})" if rss else "-"
        print(f"| {name} | {s:.1f} | {s / cp_s:.2f} | {rss_s} | {rd / 1e9:.2f} | {wr / 1e9:.2f} |")


if __name__ == "__main__":
    main()
