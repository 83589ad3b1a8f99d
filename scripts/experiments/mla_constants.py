"""Tune one of ``kvsurgeon.convert.mla.plan.MlaTuning``'s fields at one MLA budget on the real SmolLM2,
scored on pydocs-train documents that calibration never sees (the last --tail-docs documents; the
shipped calibration reads the first 4,096 tokens), so pydocs-valid stays for the reported numbers.

    python scripts/experiments/mla_constants.py 128 64 kv_balance=1     # R, Dr, FIELD=VALUE ...
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

import kvsurgeon.convert.mla.plan as to_mla  # noqa: E402
from bench_common import ROOT, SOURCE, TRAIN  # noqa: E402
from kvsurgeon.convert.pipeline.spec import ConversionSpec  # noqa: E402
from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model  # noqa: E402
from kvsurgeon.convert.evaluation.perplexity import evaluate  # noqa: E402
from mla_tools import tuning_overrides  # noqa: E402  (this folder)


def main(argv: list[str]) -> None:
    tail_docs, eval_tokens = 200, 8192
    R, Dr, *settings = argv
    calib = dict(calib_data=str(TRAIN), calib_tokens=4096)
    fields = []
    for kv in settings:
        name, value = kv.split("=", 1)
        if name == "calib":
            calib["calib_tokens"] = int(value)
        elif name == "per_text":
            calib["calib_windows_per_text"] = int(value)
        else:
            fields.append(kv)
    tuning = tuning_overrides(fields, also=", or calib, per_text")
    tag = "_".join(argv).replace("=", "")
    out = ROOT / "runs" / "tune" / tag
    spec = ConversionSpec(to="mla", kv_lora_rank=int(R), rope_dim=int(Dr), **calib)
    plan = to_mla.mla_plan(int(R), int(Dr), tuning=to_mla.MlaTuning(**tuning))
    t0 = time.time()
    convert_model(SOURCE, plan, ConvertOptions(out=out, overwrite=True, calib=spec.calib_config(), measure="off"))
    secs = time.time() - t0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.writelines(TRAIN.read_text().splitlines(keepends=True)[-tail_docs:])
        f.flush()
        r = evaluate(str(out), f.name, reference=SOURCE, max_tokens=eval_tokens, seq_len=512, progress=False)
    print(json.dumps({"tag": tag, "ppl": r.ppl, "reference_ppl": r.reference_ppl, "ratio": r.ppl / r.reference_ppl,
                      "kl": r.kl, "convert_s": secs}))


if __name__ == "__main__":
    main(sys.argv[1:])
