#!/usr/bin/env python
"""README command 1: convert the real SmolLM2 every way kvsurgeon can, evaluate each against the
source on held-out text, and print one table.

Calibration uses the built-in text, evaluation the built-in held-out text (both PSF-licensed
Python documentation shipped with the package); pass --data to evaluate on your own file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
HELDOUT = Path(__file__).resolve().parents[1] / "convert" / "data" / "heldout.jsonl"

# (name, convert arguments): every conversion kvsurgeon has, on the built-in calibration text.
JOBS: list[tuple[str, list[str]]] = [
    ("MQA, mean pooling (GQA paper baseline)", ["--to", "mqa", "--method", "mean"]),
    ("MQA, calibrated", ["--to", "mqa"]),
    # MLA's query refit costs ~1 min per 1K calibration tokens at -50% on 2 cores: half the default budget
    ("MLA -50% (R 128 + Dr 64), calibrated", ["--to", "mla", "--kv-lora-rank", "128", "--rope-dim", "64", "--calib-tokens", "4096"]),
    ("MLA -75% (R 64 + Dr 32), calibrated", ["--to", "mla", "--kv-lora-rank", "64", "--rope-dim", "32", "--calib-tokens", "4096"]),
    ("hybrid: 50% Mamba2 (even), init only", ["--to", "hybrid", "--keep-attention", "0.5", "--linear-layers", "even"]),
]


def run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HELDOUT), help="held-out text for eval")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/demo", help="where converted models go")
    args = ap.parse_args()
    console = Console()
    exe = [sys.executable, "-m", "kvsurgeon.convert.cli"]

    console.rule(f"inspect {SOURCE}")
    console.print(run(exe + ["inspect", SOURCE]))
    rows = []
    console.rule("eval of the source")
    src = json.loads(run(exe + ["eval", SOURCE, "--data", args.data, "--max-tokens", str(args.max_tokens), "--json"]))
    rows.append(("source (GQA 9/3)", "-", src["kv_bytes_per_token"], src["ppl"], 0.0, 1.0))
    for i, (name, conv) in enumerate(JOBS):
        out = Path(args.out) / f"job{i}"
        console.rule(f"convert: {name}")
        t0 = time.time()
        run(exe + ["convert", SOURCE, *conv, "--out", str(out), "--overwrite", "--measure", "off"])  # the demo evaluates below
        secs = time.time() - t0
        r = json.loads(run(exe + ["eval", str(out), "--reference", SOURCE, "--data", args.data,
                                  "--max-tokens", str(args.max_tokens), "--json"]))
        rows.append((name, f"{secs:.0f}", r["kv_bytes_per_token"], r["ppl"], r["kl"], r["top1_agreement"]))

    t = Table(title=f"kvsurgeon on {SOURCE}: {src['tokens']:,} held-out tokens ({Path(args.data).name}), no training")
    for c in ("model", "convert s", "KV bytes/token", "KV @ 32K", "ppl", "KL(src||model)", "top-1 agree"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for name, secs, kvb, ppl, kl, top1 in rows:
        t.add_row(name, secs, f"{kvb:,}", f"{kvb * 32768 / 2**20:.0f} MiB", f"{ppl:.2f}", f"{kl:.3f}", f"{top1:.1%}")
    console.print(t)


if __name__ == "__main__":
    main()
