#!/usr/bin/env python
"""Long-context fidelity of each conversion of the real SmolLM2, against the source in the same run.

For each job: convert (CLI defaults unless the job says otherwise; calibration never touches
pydocs-valid), then measure passkey and multikey retrieval over lengths x depths, perplexity per
position bucket on pydocs-valid long windows, and 512-window perplexity on pydocs-valid. Writes
JSON, a Markdown table and a PNG heatmap to --out.

    HF_HUB_OFFLINE=1 python scripts/bench_long_context.py --out runs/bench-long
    HF_HUB_OFFLINE=1 python scripts/bench_long_context.py --jobs mqa --extra "mqa-2k=--to mqa --calib-seq-len 2048" --out runs/bench-long-mqa
    HF_HUB_OFFLINE=1 python scripts/bench_long_context.py --jobs mla75 --tasks passkey,long-ppl --out runs/bench-long-mla75

Cost on 2 cores: ~5 min of eval per model at the default grid, plus each conversion; at 4K each
retrieval task alone is 13-20 min per model, so --tasks drops the ones a question does not need
(the source is measured on the same tasks). 512-window perplexity always runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SOURCE, TRAIN, VALID, convert, missing_text, named  # noqa: E402
from kvsurgeon.convert.errors import KvSurgeonError  # noqa: E402
from kvsurgeon.convert.evaluation.long_context import (  # noqa: E402  (TASKS: --tasks' default and help)
    TASKS, LongContextOptions, long_ppl_windows, measure_long_context,
)
from kvsurgeon.convert.token_counts import parse_token_counts  # noqa: E402

# name -> convert arguments. Calibration: the CLI default (built-in text) unless stated.
JOBS: dict[str, list[str]] = {
    "mqa": ["--to", "mqa"],
    "mla50": ["--to", "mla", "--kv-lora-rank", "128", "--rope-dim", "64"],
    "mla75": ["--to", "mla", "--kv-lora-rank", "64", "--rope-dim", "32"],
    "hybrid50": ["--to", "hybrid", "--keep-attention", "0.5", "--linear-layers", "auto",
                 "--transfer-tokens", "8192", "--calib-data", str(TRAIN)],
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, list[str]], LongContextOptions]:
    """The arguments, the jobs to run (name -> convert arguments) and the long-context options; every
    refusal (argparse's exit 2, the problem named) comes here, before anything is converted or written."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="mqa,mla50,mla75", help=f"comma-separated, from {', '.join(JOBS)} ('' for --extra jobs only)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                    help="an extra job: name=convert arguments (space-separated), e.g. 'mqa-2k=--to mqa --calib-seq-len 2048'")
    ap.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens (1K, 2K... accepted)")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help=f"comma-separated long-context tasks for every model, source included, from {', '.join(TASKS)}")
    ap.add_argument("--long-seq-len", type=int, default=4096)
    ap.add_argument("--long-windows", type=int, default=2)
    ap.add_argument("--short-tokens", type=int, default=16384,
                    help="512-window ppl: tokens per domain (4,096 = 8 windows proved too few to compare two models)")
    ap.add_argument("--domain2", default="runs/data/handbook-valid.jsonl",
                    help="a second held-out domain for 512-window ppl (scripts/build_second_domain.py); skipped if missing")
    ap.add_argument("--reuse", action="store_true", help="reuse converted folders already in --out")
    ap.add_argument("--out", default="runs/bench-long")
    args = ap.parse_args(argv)
    names = [n for n in args.jobs.split(",") if n]
    if bad := [n for n in names if n not in JOBS]:
        ap.error(f"unknown job {', '.join(bad)}; choose from {', '.join(JOBS)}, or add one with --extra NAME=ARGS")
    jobs = {n: JOBS[n] for n in names}
    for e in args.extra:
        try:
            name, rest = named(e, "--extra", "mqa-2k=--to mqa --calib-seq-len 2048")
        except ValueError as err:
            ap.error(str(err))
        if name in jobs or name == "source":
            ap.error(f"--extra {name}: a row of that name is already in the run; pick another name")
        jobs[name] = rest.split()
    try:
        opts = LongContextOptions(
            tasks=tuple(t for t in args.tasks.split(",") if t), lengths=parse_token_counts(args.lengths, "--lengths"),
            depths=args.depths, samples=args.samples, keys=args.keys, long_seq_len=args.long_seq_len,
            long_windows=args.long_windows, data=str(VALID),
        )
    except KvSurgeonError as e:  # LongContextError is one
        ap.error(str(e))
    if problem := missing_text(VALID):
        ap.error(problem)
    return args, jobs, opts


def main(argv: list[str] | None = None) -> None:
    args, jobs, opts = parse_args(argv)

    import torch

    from kvsurgeon.convert.evaluation.perplexity import evaluate, load_model, load_tokenizer
    from kvsurgeon.convert.evaluation.report import heatmap_png, markdown
    from kvsurgeon.convert.io.resolve import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src_path = resolve_model(SOURCE)
    tok = load_tokenizer(src_path)
    windows = long_ppl_windows(tok, opts) if "long-ppl" in opts.tasks else None
    torch.manual_seed(0)

    rows, results = [], []
    ref, _ = load_model(SOURCE)
    t0 = time.time()
    res = measure_long_context(ref, tok, opts, "source", windows=windows)
    short = evaluate(SOURCE, str(VALID), max_tokens=args.short_tokens, progress=False, model=ref)
    results.append(res)
    rows.append({"name": "source", "convert": None, "ppl512": short.ppl, "kv_bytes_per_token": short.kv_bytes_per_token,
                 "eval_seconds": time.time() - t0, **res.as_dict()})
    print(markdown(results), flush=True)
    for name, conv in jobs.items():
        folder = out / name
        stats = None
        if not (args.reuse and (folder / "config.json").is_file()):
            stats = convert(conv, folder)
            print(f"{name}: converted in {stats['seconds']:.0f} s", flush=True)
        model, _ = load_model(str(folder))
        t0 = time.time()
        res = measure_long_context(model, tok, opts, name, windows=windows)
        short = evaluate(str(folder), str(VALID), reference=SOURCE, max_tokens=args.short_tokens, progress=False,
                         model=model, reference_model=ref)
        results.append(res)
        d2 = {}
        if Path(args.domain2).is_file():
            s2 = evaluate(str(folder), args.domain2, reference=SOURCE, max_tokens=args.short_tokens, progress=False,
                          model=model, reference_model=ref)
            d2 = {"domain2_ppl512": s2.ppl, "domain2_ppl512_ratio": s2.ppl / s2.reference_ppl, "domain2_source_ppl512": s2.reference_ppl}
        rows.append({"name": name, "convert": "kvsurgeon convert " + SOURCE + " " + " ".join(conv), "convert_stats": stats, **d2,
                     "ppl512": short.ppl, "ppl512_ratio": short.ppl / short.reference_ppl, "kl512": short.kl,
                     "kv_bytes_per_token": short.kv_bytes_per_token, "eval_seconds": time.time() - t0, **res.as_dict()})
        del model
        (out / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(markdown(results), flush=True)
    md = markdown(results)
    md += "\n| model | KV bytes/token | 512-window ppl, pydocs-valid (ratio) | 512-window ppl ratio, second domain |\n|---|---:|---:|---:|\n"
    for r in rows:
        d2 = f"{r['domain2_ppl512_ratio']:.2f}x" if "domain2_ppl512_ratio" in r else "-"
        md += f"| {r['name']} | {r['kv_bytes_per_token']:,} | {r['ppl512']:.2f} ({r.get('ppl512_ratio', 1.0):.2f}x) | {d2} |\n"
    (out / "results.md").write_text(md)
    heatmap_png(results, out / "long_context.png", title=f"{SOURCE}: {' / '.join(opts.tasks)}, no training")
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'long_context.png'}")


if __name__ == "__main__":
    main()
