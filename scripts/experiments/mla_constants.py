"""Tune one of ``kvsurgeon.convert.to_mla``'s constants at one MLA budget on the real SmolLM2,
scored on pydocs-train documents that calibration never sees (the last --tail-docs documents; the
shipped calibration reads the first 4,096 tokens), so pydocs-valid stays for the reported numbers.

    python scripts/experiments/mla_constants.py 128 64 KV_BALANCE=1     # R, Dr, NAME=VALUE ...
    python scripts/experiments/mla_constants.py 64 32 calib=16384        # calibration tokens (default 4096)
    python scripts/experiments/mla_constants.py 64 32 calib=8192 per_text=1   # --calib-windows-per-text

Prints one JSON line: ppl, the source's ppl on the same windows, their ratio, KL, conversion seconds.
The K/V balance rule in to_mla.kv_balance came from this (2026-11-23, -50% R128/Dr64: 8 -> 1.50x,
1 -> 1.33x the source).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvsurgeon.convert.to_mla as to_mla  # noqa: E402
from bench_common import ROOT, SOURCE, TRAIN  # noqa: E402
from kvsurgeon.convert.cli import app  # noqa: E402
from kvsurgeon.convert.evaluate import evaluate  # noqa: E402


def main(argv: list[str]) -> None:
    tail_docs, eval_tokens = 200, 8192
    R, Dr, *settings = argv
    calib_tokens, extra = "4096", []
    for kv in settings:
        name, value = kv.split("=", 1)
        if name == "calib":
            calib_tokens = value
            continue
        if name == "per_text":
            extra = ["--calib-windows-per-text", value]
            continue
        if not hasattr(to_mla, name):
            raise SystemExit(f"to_mla has no constant {name}")
        setattr(to_mla, name, json.loads(value))
    tag = "_".join(argv).replace("=", "")
    out = ROOT / "runs" / "tune" / tag
    t0 = time.time()
    app(["convert", SOURCE, "--to", "mla", "--kv-lora-rank", R, "--rope-dim", Dr, "--calib-data", str(TRAIN),
         "--calib-tokens", calib_tokens, *extra, "--out", str(out), "--overwrite", "--measure", "off"], standalone_mode=False)
    secs = time.time() - t0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.writelines(TRAIN.read_text().splitlines(keepends=True)[-tail_docs:])
        f.flush()
        r = evaluate(str(out), f.name, reference=SOURCE, max_tokens=eval_tokens, seq_len=512, progress=False)
    print(json.dumps({"tag": tag, "ppl": r.ppl, "reference_ppl": r.reference_ppl, "ratio": r.ppl / r.reference_ppl,
                      "kl": r.kl, "convert_s": secs}))


if __name__ == "__main__":
    main(sys.argv[1:])
