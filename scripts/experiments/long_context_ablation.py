"""What destroys long-context retrieval in a conversion, one change at a time, on the real SmolLM2.

Scored on generated passkey prompts and on pydocs-train documents that calibration never sees (the
last 200 documents), never on pydocs-valid.

    python scripts/experiments/long_context_ablation.py mqa                       # CLI defaults
    python scripts/experiments/long_context_ablation.py mqa merge.context=4096    # calibrated_merge kwarg
    python scripts/experiments/long_context_ablation.py mqa merge.nope_planes=0
    python scripts/experiments/long_context_ablation.py mqa --serve-context 2048 merge.ridge=0.01  # flags and kwargs combine
    python scripts/experiments/long_context_ablation.py mqa --calib-seq-len 2048   # any convert flag
    python scripts/experiments/long_context_ablation.py mla64 --calib-seq-len 2048

Prints one JSON line per run: passkey accuracy per length, 512-window ppl ratio, long-window ppl per bucket.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvsurgeon.convert.gqa.plan as to_gqa  # noqa: E402
from bench_common import ROOT, SOURCE, ablation_eval_file  # noqa: E402
from kvsurgeon.convert.cli import app, spec_from_argv  # noqa: E402
from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model  # noqa: E402
from kvsurgeon.convert.token_counts import parse_token_counts  # noqa: E402

BASE = {
    "mqa": ["--to", "mqa"],
    "mla128": ["--to", "mla", "--kv-lora-rank", "128", "--rope-dim", "64"],
    "mla64": ["--to", "mla", "--kv-lora-rank", "64", "--rope-dim", "32"],
}


def main(argv: list[str]) -> None:
    job, *rest = argv
    merge_kw, flags, lengths, samples = {}, [], "1024,2048", 2
    for a in rest:
        if a.startswith("merge."):
            k, v = a[6:].split("=", 1)
            merge_kw[k] = json.loads(v)
        elif a.startswith("lengths="):
            lengths = a.split("=", 1)[1]
        elif a.startswith("samples="):
            samples = int(a.split("=", 1)[1])
        else:
            flags.append(a)
    tag = "_".join([job, *rest]).replace("=", "").replace("--", "").replace(".", "")
    out = ROOT / "runs" / "lc-ablation" / tag
    t0 = time.time()
    if not (out / "config.json").is_file() and merge_kw:  # calibrated_merge options are not CLI flags: build the plan
        if job != "mqa":
            raise SystemExit("merge.KEY=VALUE applies to the mqa job only")
        spec = spec_from_argv([SOURCE, *BASE[job], *flags, "--out", str(out)])
        convert_model(SOURCE, to_gqa.gqa_plan(1, spec.method or "calibrated", merge=replace(spec.merge_options(), **merge_kw)),
                      ConvertOptions(out=out, overwrite=True, calib=spec.calib_config(), measure="off"))
    elif not (out / "config.json").is_file():
        app(["convert", SOURCE, *BASE[job], *flags, "--out", str(out), "--overwrite", "--measure", "off"], standalone_mode=False)
    secs = time.time() - t0

    from kvsurgeon.convert.evaluation.perplexity import evaluate, load_model, load_tokenizer
    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, measure_long_context
    from kvsurgeon.convert.io.resolve import resolve_model

    model, path = load_model(str(out))
    tok = load_tokenizer(path)
    with ablation_eval_file() as eval_path:
        opts = LongContextOptions(tasks=("passkey", "long-ppl"), lengths=parse_token_counts(lengths, "lengths="),
                                  samples=samples, long_seq_len=2048, long_windows=2, data=eval_path)
        lc = measure_long_context(model, tok, opts, tag, progress=False)
        short = evaluate(str(out), eval_path, reference=SOURCE, max_tokens=4096, progress=False, model=model)
        src_long = None
        cache = ROOT / "runs" / "lc-ablation" / "source_long_ppl.json"
        if cache.is_file():
            src_long = json.loads(cache.read_text())
        else:
            ref, _ = load_model(SOURCE)
            src_long = measure_long_context(ref, tok, LongContextOptions(tasks=("long-ppl",), long_seq_len=2048, long_windows=2, data=eval_path), "source", progress=False).long_ppl
            cache.write_text(json.dumps(src_long))
    print(json.dumps({
        "tag": tag, "passkey": lc.passkey_by_length, "ppl512_ratio": short.ppl / short.reference_ppl,
        "long_ppl_ratio": [round(a / b, 3) for a, b in zip(lc.long_ppl, src_long)], "buckets": lc.long_ppl_buckets,
        "convert_s": round(secs),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
