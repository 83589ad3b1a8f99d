#!/usr/bin/env python
"""Uptraining's host memory: the floor the pre-run check counts against the peak a run reaches.

Each configuration (window length x gradient checkpointing) runs ``kvsurgeon uptrain`` for a few
steps in its own child process, so its peak RSS is its own; the floor, the memory available and the
RSS of the loaded models come from the run's ``memory`` row in metrics.jsonl. A configuration whose
floor exceeds the memory available is refused by the check: that is recorded, not run.

    python scripts/bench_memory.py --student mla75=runs/bench-uptrain-long-mla75-curr-aw50/mla75-converted \\
        --seq-len 2048,4096 --out runs/bench-memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SOURCE, TRAIN, named, table  # noqa: E402
from kvsurgeon.convert.errors import KvSurgeonError  # noqa: E402
from kvsurgeon.convert.token_counts import parse_token_counts  # noqa: E402

GB = 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, metavar="NAME=FOLDER", help="a converted folder to uptrain")
    ap.add_argument("--seq-len", default="2048,4096", help="window lengths, one configuration each")
    ap.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run (off, on or both)")
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps per run (the second has AdamW's moments allocated)")
    ap.add_argument("--data", default=str(TRAIN))
    ap.add_argument("--out", default="runs/bench-memory")
    args = ap.parse_args(argv)
    try:  # every refusal before the first run is written
        name, folder = named(args.student, "--student", "mla75=runs/bench-uptrain-long-mla75-curr-aw50/mla75-converted")
        lengths = parse_token_counts(args.seq_len, "--seq-len")
    except (ValueError, KvSurgeonError) as e:
        ap.error(str(e))
    if not (Path(folder) / "config.json").is_file():
        ap.error(f"--student {folder}: no config.json there; give a converted model's folder")
    settings = [c for c in args.checkpointing.split(",") if c]
    if not lengths or not settings or any(c not in ("off", "on") for c in settings):
        ap.error(f"--seq-len {args.seq_len!r} / --checkpointing {args.checkpointing!r}: at least one length, and off, on or off,on")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in lengths:
        for ck in settings:
            run = out / f"{name}-{n}-{ck}"
            shutil.rmtree(run, ignore_errors=True)
            recipe = {"source": SOURCE, "output": str(run), "student": folder,
                      "data": {"train": args.data, "seq_len": n, "retrieval": 0.5, "eval": None},
                      "stages": [{"name": "attention", "tokens": n * 10, "trainable": "attention"}],
                      "distill": {"answer_weight": 50}, "precision": "auto", "max_steps": args.steps,
                      "save_every": 1000, "gradient_checkpointing": ck == "on"}
            path = out / f"{run.name}.yaml"
            path.write_text(json.dumps(recipe))  # JSON is YAML
            stats = out / f"{run.name}.stats.json"
            proc = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_common.py"), str(stats), "uptrain", str(path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            st = json.loads(stats.read_text())
            metrics = run / "metrics.jsonl"
            memrow = next((r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "memory"), None) \
                if metrics.is_file() else None
            # the CLI wraps its error over several lines: keep the message whole
            i = proc.stderr.find("cannot fit in memory")
            refused = " ".join(proc.stderr[i:].split()) if i >= 0 else ""
            if memrow is None and not refused:
                raise SystemExit(f"{run.name} failed:\n{proc.stderr[-3000:]}")
            if refused:  # the check refused before the memory row was written: its numbers are in the message
                row = {"run": run.name, "seq_len": n, "checkpointing": ck, "result": "refused", "check_peak": st["peak_rss_bytes"] / GB,
                       "note": refused}
            else:
                row = {"run": run.name, "seq_len": n, "checkpointing": ck, "result": f"{args.steps} steps",
                       "loaded": memrow["loaded_rss_bytes"] / GB, "floor": memrow["floor_bytes"] / GB,
                       "available": (memrow["available_bytes"] or 0) / GB, "peak": st["peak_rss_bytes"] / GB,
                       "seconds": st["seconds"]}
                row["peak_over_loaded_plus_floor"] = row["peak"] / (row["loaded"] + row["floor"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = table([r for r in rows if r["result"] != "refused"],
               [("run", "run"), ("loaded models (GB)", "{loaded:.2f}"), ("floor (GB)", "{floor:.2f}"),
                ("process peak (GB)", "{peak:.2f}"), ("peak / (loaded + floor)", "{peak_over_loaded_plus_floor:.2f}")])
    md += "".join(f"\n\n{r['run']}: {r['note']}" for r in rows if r["result"] == "refused")
    (out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
