#!/usr/bin/env python
"""MHA/GQA -> MQA on the real SmolLM2 (3 KV heads -> 1), no training: the source, mean pooling
(the GQA paper's baseline) and calibrated merging, measured in one run on pydocs-valid.

    python scripts/bench_gqa.py [--eval-tokens 16384] [--calib-tokens 8192]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import ROOT, TRAIN, convert, dump, evaluate, reference_model, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-gqa"))
    args = ap.parse_args()
    out = Path(args.out)
    ref = reference_model()
    jobs = {
        "mean": ["--to", "mqa", "--method", "mean"],
        "calibrated": ["--to", "mqa", "--method", "calibrated", "--calib-data", str(TRAIN), "--calib-tokens", str(args.calib_tokens)],
    }
    rows = []
    for name, conv in jobs.items():
        st = convert(conv, out / name)
        r = evaluate(out / name, args.eval_tokens, args.seq_len, ref)
        if not rows:
            rows.append({"method": "source (GQA 9/3)", "ppl": r.reference_ppl, "kl": 0.0, "top1": 1.0,
                         "kv": r.reference_kv_bytes_per_token, "secs": 0.0, "rss": 0.0, "ratio": 1.0})
        rows.append({"method": f"MQA {name}", "ppl": r.ppl, "kl": r.kl, "top1": r.top1_agreement, "kv": r.kv_bytes_per_token,
                     "secs": st["seconds"], "rss": st["peak_rss_bytes"] / 2**30, "ratio": r.ppl / r.reference_ppl,
                     "command": st["command"]})
        print(f"{name}: ppl {r.ppl:.2f} (source {r.reference_ppl:.2f}), KL {r.kl:.3f}", flush=True)
    dump(rows, out / "results.json")
    print(f"\n{r.tokens:,} predicted tokens of pydocs-valid ({r.windows} x {r.seq_len}), no training\n")
    print(table(rows, [("method", "method"), ("KV bytes/token", "{kv:,}"), ("ppl", "{ppl:.2f}"), ("x source", "{ratio:.2f}"),
                       ("KL(src||model)", "{kl:.3f}"), ("top-1", "{top1:.1%}"), ("convert s", "{secs:.1f}"), ("peak RSS GiB", "{rss:.2f}")]))
    for r in rows[1:]:
        print(f"  {r['method']}: {r['command']}")


if __name__ == "__main__":
    main()
