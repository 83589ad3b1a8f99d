#!/usr/bin/env python
"""GQA -> DeepSeek MLA on the real SmolLM2 (cache 2 x 3 x 64 = 384 values/token/layer), no training:
two budgets (192 = -50%, 96 = -75%), `calibrated` vs the weight-only joint SVD baseline (`svd`),
measured in one run on pydocs-valid with the source alongside.

    python scripts/bench_mla.py [--eval-tokens 16384] [--calib-tokens 8192] [--calib-windows-per-text 1]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_common import ROOT, TRAIN, convert, dump, evaluate, reference_model, table

# budget (values/token/layer) -> (kv_lora_rank R, rope dim Dr)
BUDGETS = {192: (128, 64), 96: (64, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-windows-per-text", type=int, default=None, help="spread calibration over more documents")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-mla"))
    args = ap.parse_args()
    out = Path(args.out)
    ref = reference_model()
    rows = []
    for budget, (R, Dr) in BUDGETS.items():
        for method in ("svd", "calibrated"):
            name = f"mla{budget}-{method}"
            conv = ["--to", "mla", "--kv-lora-rank", str(R), "--rope-dim", str(Dr), "--method", method,
                    "--calib-data", str(TRAIN), "--calib-tokens", str(args.calib_tokens)]
            if args.calib_windows_per_text:
                conv += ["--calib-windows-per-text", str(args.calib_windows_per_text)]
            st = convert(conv, out / name)
            r = evaluate(out / name, args.eval_tokens, args.seq_len, ref)
            if not rows:
                rows.append({"name": "source (GQA 9/3)", "R": "-", "Dr": "-", "values": 384, "ppl": r.reference_ppl, "ratio": 1.0,
                             "kl": 0.0, "top1": 1.0, "kv": r.reference_kv_bytes_per_token, "secs": 0.0, "rss": 0.0})
            rows.append({"name": f"MLA {method}", "R": R, "Dr": Dr, "values": R + Dr, "ppl": r.ppl, "ratio": r.ppl / r.reference_ppl,
                         "kl": r.kl, "top1": r.top1_agreement, "kv": r.kv_bytes_per_token, "secs": st["seconds"],
                         "rss": st["peak_rss_bytes"] / 2**30, "command": st["command"]})
            print(f"{name}: ppl {r.ppl:.2f} (source {r.reference_ppl:.2f}), KL {r.kl:.3f}", flush=True)
    dump(rows, out / "results.json")
    print(f"\n{r.tokens:,} predicted tokens of pydocs-valid ({r.windows} x {r.seq_len}), no training\n")
    print(table(rows, [("model", "name"), ("R", "R"), ("Dr", "Dr"), ("values/token/layer", "values"), ("KV bytes/token", "{kv:,}"),
                       ("ppl", "{ppl:.2f}"), ("x source", "{ratio:.2f}"), ("KL(src||model)", "{kl:.3f}"), ("top-1", "{top1:.1%}"),
                       ("convert s", "{secs:.1f}"), ("peak RSS GiB", "{rss:.2f}")]))
    for r in rows[1:]:
        print(f"  {r['name']} R={r['R']}: {r['command']}")


if __name__ == "__main__":
    main()
