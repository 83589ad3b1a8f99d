#!/usr/bin/env python
"""Recovery by distillation on a CPU budget: the real SmolLM2 converted to MQA (calibrated) and to
MLA at -75% cache, each uptrained on the same token budget of pydocs-train, with perplexity and KL
on pydocs-valid before and after. Also times the student+teacher distillation step against a plain
fine-tuning step of the source (same batch, same precision).

    python scripts/bench_uptrain.py --tokens 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from kvsurgeon.convert.train.recipe import recipe_from_dict
from kvsurgeon.convert.train.uptrain import uptrain

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONVERSIONS = {
    "mqa-calibrated": {"to": "mqa", "method": "calibrated"},
    "mla-75%": {"to": "mla", "method": "calibrated", "kv_lora_rank": 64, "rope_dim": 32},
}


def plain_finetune_tokens_per_s(seq_len: int, steps: int = 4) -> float:
    """One fine-tuning step of the source alone (CE loss), in the precision the uptraining resolves to
    here (bf16 autocast where native, else fp32), as the reference speed."""
    from transformers import AutoModelForCausalLM

    from kvsurgeon.convert.io.resolve import resolve_model
    from kvsurgeon.convert.train.precision import detect_precision

    bf16 = detect_precision("auto")[0] == "bf16"

    model = AutoModelForCausalLM.from_pretrained(resolve_model(SOURCE), dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    times = []
    for _ in range(steps + 1):
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t0)
    return seq_len / (sum(times[1:]) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000, help="uptraining tokens per conversion")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)  # 5e-4 diverged for MLA (BENCHMARKS.md)
    ap.add_argument("--only", choices=sorted(CONVERSIONS), action="append")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-uptrain"))
    ap.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER",
                    help="reuse an existing conversion for NAME (e.g. mla-75%%=runs/bench-mla/mla96-calibrated, made by "
                         "bench_mla.py with the same options) instead of converting again")
    args = ap.parse_args()
    students = dict(s.split("=", 1) for s in args.student)
    unknown = set(students) - set(CONVERSIONS)
    if unknown:
        ap.error(f"--student: unknown conversion(s) {sorted(unknown)}; choose from {sorted(CONVERSIONS)}")
    torch.set_num_threads(os.cpu_count() or 2)

    rows = []
    for name in args.only or list(CONVERSIONS):
        out = Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)
        recipe = recipe_from_dict({
            "source": SOURCE,
            "output": str(out),
            **({"student": students[name]} if name in students else
               {"conversion": {**CONVERSIONS[name], "calib_data": str(SHARED / "pydocs-train.jsonl"), "calib_tokens": 8192}}),
            "data": {"train": str(SHARED / "pydocs-train.jsonl"), "seq_len": args.seq_len,
                     "eval": str(SHARED / "pydocs-valid.jsonl"), "eval_tokens": args.eval_tokens},
            "stages": [{"name": "attention", "tokens": args.tokens, "trainable": "attention"}],
            "optim": {"lr": args.lr, "warmup_steps": 10, "schedule": "cosine"},
            "precision": "auto",
            "save_every": 100,
        })
        t0 = time.time()
        uptrain(recipe)
        secs = time.time() - t0
        metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in metrics if m["kind"] == "eval"]
        train = [m for m in metrics if m["kind"] == "train"]
        before, after = evals[0], evals[-1]
        tps = sorted(m["tokens_per_s"] for m in train)[len(train) // 2]
        gap_before = before["ppl"] - before["reference_ppl"]
        gap_after = after["ppl"] - after["reference_ppl"]
        rows.append((name, train[-1]["tokens"], before, after, 1 - gap_after / gap_before, tps, secs))

    plain = plain_finetune_tokens_per_s(args.seq_len)
    print()
    print(f"source ppl on {args.eval_tokens} tokens of pydocs-valid: {rows[0][2]['reference_ppl']:.2f}")
    print("| conversion | tokens | ppl before | KL before | ppl after | KL after | gap closed | distil tok/s | plain FT tok/s | wall min |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, tokens, b, a, closed, tps, secs in rows:
        print(f"| {name} | {tokens:,} | {b['ppl']:.2f} | {b['kl']:.3f} | {a['ppl']:.2f} | {a['kl']:.3f} | {closed:.0%} | "
              f"{tps:.0f} | {plain:.0f} | {secs / 60:.1f} |")


if __name__ == "__main__":
    main()
