"""Untrained long-window perplexity of converted folders against the real SmolLM2, without passkey prompts
(a few minutes per model on 2 cores, where bench_long_context's full grid takes ~5-25).

Scored on the last 200 pydocs-train documents, which calibration and the uptraining set never use, never on
pydocs-valid, so a choice made from it is not tuned on the evaluation text:

    python scripts/experiments/long_ppl_probe.py runs/mqa-default runs/mqa-p8 runs/mqa-p4 runs/mqa-nope0

Prints one JSON line per model: 512-window ppl ratio (16,384 tokens) and the ratio per position bucket of two
4,096-token windows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import SOURCE, ablation_eval_file  # noqa: E402


def main(folders: list[str]) -> None:
    import torch

    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, long_ppl_windows, measure_long_context
    from kvsurgeon.convert.evaluation.perplexity import evaluate, load_model, load_tokenizer
    from kvsurgeon.convert.io.resolve import resolve_model

    torch.set_num_threads(os.cpu_count() or 2)
    tok = load_tokenizer(resolve_model(SOURCE))
    with ablation_eval_file() as eval_path:
        opts = LongContextOptions(tasks=("long-ppl",), long_seq_len=4096, long_windows=2, data=eval_path)
        windows = long_ppl_windows(tok, opts)
        ref, _ = load_model(SOURCE)
        src = measure_long_context(ref, tok, opts, "source", progress=False, windows=windows)
        print(json.dumps({"model": "source", "long_ppl": [round(p, 3) for p in src.long_ppl], "buckets": src.long_ppl_buckets}), flush=True)
        for folder in folders:
            t0 = time.time()
            model, _ = load_model(folder)
            lc = measure_long_context(model, tok, opts, folder, progress=False, windows=windows)
            short = evaluate(folder, eval_path, reference=SOURCE, max_tokens=16384, progress=False, model=model, reference_model=ref)
            print(json.dumps({"model": folder, "ppl512_ratio": round(short.ppl / short.reference_ppl, 3),
                              "long_ppl_ratio": [round(a / b, 2) for a, b in zip(lc.long_ppl, src.long_ppl)],
                              "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
