"""The ``auto`` hybrid ranking with a retrieval term: each layer linearised alone (``rank_layers``, streaming,
one layer in memory), scored on calibration windows of 2,048 tokens that all carry retrieval facts, by the
KL at every 4th position plus the KL at the last 32 (the restated fact), instead of on 512-token windows
of plain text. Prints the ranking and the ``--linear-layers`` list that keeps the top KEEP as attention.

    python scripts/experiments/hybrid_rank_retrieval.py --keep 8 --out runs/hybrid-tail/ranking.json

Then convert with that list (``kvsurgeon convert ... --to hybrid --linear-layers LIST``) and measure it
(``kvsurgeon eval``); BENCHMARKS.md, "Hybrid 75%: which attention layers to keep".
"""

from __future__ import annotations

import argparse
import json

from kvsurgeon.convert.hybrid.plan import auto_linear_layers, rank_layers
from kvsurgeon.convert.io.checkpoint import LazyCheckpoint, read_config
from kvsurgeon.convert.io.resolve import resolve_model
from kvsurgeon.convert.pipeline.calibration import CalibConfig

TRAIN = "/work/shared/data/pydocs-train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--keep", type=int, default=8, help="attention layers kept")
    ap.add_argument("--tokens", type=int, default=4096, help="ranking tokens (2 windows of --seq-len)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=32, help="positions at each window's end scored as retrieval")
    ap.add_argument("--out", required=True, help="the ranking as JSON")
    args = ap.parse_args()
    src = resolve_model(args.model)
    cfg = read_config(src)
    ckpt = LazyCheckpoint(src)
    # auto's own choice from a ranking (kept = the top KEEP; prints the table), here fed the tail-scored one
    layers, ranking = auto_linear_layers(
        cfg, args.keep, None, print,
        lambda: rank_layers(ckpt, cfg, "granite", CalibConfig(data=TRAIN), tokens=args.tokens, seq_len=args.seq_len,
                            tail=args.tail, log=print))
    print("--linear-layers " + ",".join(map(str, layers)))
    with open(args.out, "w") as f:
        json.dump(ranking, f, indent=1)


if __name__ == "__main__":
    main()
