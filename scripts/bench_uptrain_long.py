#!/usr/bin/env python
"""How much long-context retrieval distillation at long sequence length buys back, on a CPU budget.

One conversion of the real SmolLM2 (CLI defaults unless --convert says otherwise, or --student reuses
a folder) is uptrained by distillation from the source on 2,048-token windows of pydocs-train
documents held out from calibration (the first 6, which the built-in calibration text is, and the
last 200, which the ablations evaluate on, are both excluded). ``--retrieval`` rewrites that fraction
of training windows with "access code" facts restated at the window's end (phrasing unlike the
passkey eval's). The source, the student before and the student after are then measured in the same
run: passkey and multikey at 1K/2K, ppl by position at 4K, and 512-window ppl on pydocs-valid and on
the second domain.

    python scripts/bench_uptrain_long.py --student mqa=runs/bench-long-base/mqa --tokens 100000

A curriculum: one stage per length, ``--seq-len 2048,4096 --tokens 98304,98304`` (the data continues
from stage to stage; each stage has its own optimiser and schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ABLATION_DOCS, SOURCE, TRAIN, VALID, convert, missing_text, named  # noqa: E402

if TYPE_CHECKING:
    from kvsurgeon.convert.evaluation.long_context import LongContextOptions
    from kvsurgeon.convert.train.recipe import Recipe

CALIB_DOCS = 6
HELD_OUT_TRAIN = Path("runs/data/pydocs-uptrain.jsonl")  # also what recipes/smollm2-{mqa,mla}-long.yaml train on


def held_out_train(out: Path) -> Path:
    """pydocs-train minus the built-in calibration documents and the ablations' eval tail."""
    lines = [l for l in TRAIN.read_text().splitlines() if l.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[CALIB_DOCS:-ABLATION_DOCS]) + "\n")
    return out


def stage_names(trainable: str, lengths: list[int]) -> list[str]:
    """One name per stage, by its length; a length that comes back (2K, 4K, 2K) is numbered, so the
    metrics keep the stages apart."""
    if len(lengths) == 1:
        return [trainable]
    names = [f"{trainable}-{n}" for n in lengths]
    return [f"{x}-{names[:i].count(x) + 1}" if x in names[:i] else x for i, x in enumerate(names)]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str, str, Recipe, LongContextOptions]:
    """The arguments, the student's name and folder, the recipe and the long-context options; every refusal
    (argparse's exit 2, the problem named) comes here, before the conversion (20-50 min) or the training
    (hours) would surface it."""
    from kvsurgeon.convert.errors import KvSurgeonError
    from kvsurgeon.convert.evaluation.long_context import LongContextError, LongContextOptions
    from kvsurgeon.convert.token_counts import parse_token_counts
    from kvsurgeon.convert.train.recipe import RecipeError, recipe_from_dict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", metavar="NAME=FOLDER", help="reuse a conversion (e.g. mqa=runs/bench-long-base/mqa)")
    ap.add_argument("--convert", metavar="NAME=ARGS", help="or convert now, e.g. 'mqa=--to mqa'")
    ap.add_argument("--tokens", default="100000", help="training tokens (96K accepted); one per stage, or one total split evenly")
    ap.add_argument("--seq-len", default="2048", help="window length (2K accepted); several (2048,4096) make one stage each")
    ap.add_argument("--retrieval", type=float, default=0.5, help="fraction of training windows with retrieval facts")
    ap.add_argument("--retrieval-far", type=float, default=0.0,
                    help="of those, the fraction whose asked fact sits in the window's first 10%% (0 = uniform depths)")
    ap.add_argument("--retrieval-facts", type=int, default=3, help="facts stated in each retrieval window (1-8)")
    ap.add_argument("--retrieval-asks", type=int, default=1,
                    help="facts of a retrieval window restated at its end, each one an answer")
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="KL weight of the restated code's tokens in retrieval windows (1 = plain mean)")
    ap.add_argument("--lead-weight", type=float, default=None,
                    help="KL weight of the code's first token alone (default: --answer-weight)")
    ap.add_argument("--answer-ce", type=float, default=0.0,
                    help="weight of the cross-entropy on the restated code's true tokens (0 = KL only)")
    ap.add_argument("--seed", type=int, default=0, help="recipe seed: another draw of which windows carry facts, and which facts")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--schedule-span", default="stage", choices=["stage", "run"],
                    help="stage: each stage warms up and decays on its own; run: one warm-up and decay across the stages")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass: lowers the peak (MLA -75%% at 4K: 11.1 -> 8.2 GB), slower")
    ap.add_argument("--trainable", default="attention", choices=["attention", "all", "new"])
    ap.add_argument("--lengths", default="1024,2048", help="passkey/multikey prompt lengths (1K, 2K... accepted)")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--short-tokens", type=int, default=16384,
                    help="512-window ppl: tokens per domain (4,096 = 8 windows proved too few to compare two models)")
    ap.add_argument("--domain2", default="runs/data/handbook-valid.jsonl")
    ap.add_argument("--out", default="runs/bench-uptrain-long")
    args = ap.parse_args(argv)
    if bool(args.student) == bool(args.convert):
        ap.error("pass exactly one of --student NAME=FOLDER or --convert NAME=ARGS")
    try:
        if args.student:
            name, spec = named(args.student, "--student", "mqa=runs/bench-long-base/mqa")
        else:
            name, spec = named(args.convert, "--convert", "mqa=--to mqa")
        lengths = list(parse_token_counts(args.seq_len, "--seq-len"))
        budget = list(parse_token_counts(args.tokens, "--tokens"))
        eval_lengths = parse_token_counts(args.lengths, "--lengths")
    except (ValueError, KvSurgeonError) as e:
        ap.error(str(e))
    if not (lengths and budget and eval_lengths):
        ap.error("--seq-len, --tokens and --lengths: give at least one token count each, e.g. --seq-len 2048,4096")
    if args.student and not (Path(spec) / "config.json").is_file():
        ap.error(f"--student {spec}: no config.json there; give a converted model's folder, or --convert NAME=ARGS")
    if len(budget) == 1:
        budget = [budget[0] // len(lengths)] * len(lengths)
    if len(budget) != len(lengths):
        ap.error(f"--tokens gives {len(budget)} budgets for {len(lengths)} --seq-len stages; give one, or one per stage")
    if problem := missing_text(TRAIN, VALID):
        ap.error(problem)
    out = Path(args.out)
    student = out / f"{name}-converted" if args.convert else Path(spec)
    try:
        recipe = recipe_from_dict({
            "source": SOURCE, "output": str(out / f"{name}-uptrained"), "student": str(student),
            "data": {"train": str(HELD_OUT_TRAIN), "seq_len": lengths[0], "retrieval": args.retrieval,
                     "retrieval_far": args.retrieval_far, "retrieval_asks": args.retrieval_asks,
                     "retrieval_facts": args.retrieval_facts, "eval": None},
            "stages": [{"name": name, "tokens": t, "trainable": args.trainable, "seq_len": n}
                       for name, n, t in zip(stage_names(args.trainable, lengths), lengths, budget)],
            "optim": {"lr": args.lr, "warmup_steps": 5, "schedule": "cosine", "schedule_span": args.schedule_span},
            "distill": {"answer_weight": args.answer_weight, "lead_weight": args.lead_weight, "answer_ce": args.answer_ce},
            "precision": "auto", "save_every": 10, "seed": args.seed, "gradient_checkpointing": args.gradient_checkpointing,
        })
        opts = LongContextOptions(tasks=("passkey", "multikey", "long-ppl"), lengths=eval_lengths,
                                  depths=args.depths, samples=args.samples, data=str(VALID))
    except (RecipeError, LongContextError) as e:
        ap.error(str(e))
    return args, name, spec, recipe, opts


def main(argv: list[str] | None = None) -> None:
    args, name, spec, recipe, opts = parse_args(argv)
    lengths = [s.seq_len for s in recipe.stages]
    budget = [s.tokens for s in recipe.stages]

    import torch

    from kvsurgeon.convert.evaluation.perplexity import evaluate, load_model, load_tokenizer
    from kvsurgeon.convert.evaluation.long_context import long_ppl_windows, measure_long_context
    from kvsurgeon.convert.evaluation.report import heatmap_png, markdown
    from kvsurgeon.convert.io.resolve import resolve_model
    from kvsurgeon.convert.train.uptrain import uptrain

    torch.set_num_threads(os.cpu_count() or 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student, run = Path(recipe.student), Path(recipe.output)
    if args.convert:
        convert(spec.split(), student)
    held_out_train(HELD_OUT_TRAIN)
    t0 = time.time()
    uptrain(recipe, resume=(run / "checkpoints").is_dir())
    train_secs = time.time() - t0
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if m["kind"] == "train"]

    tok = load_tokenizer(resolve_model(SOURCE))
    windows = long_ppl_windows(tok, opts)
    ref, _ = load_model(SOURCE)
    rows, results = [], []
    for label, folder in (("source", None), (f"{name} before", student), (f"{name} after {trained[-1]['tokens']:,} tok", run / "final")):
        model = ref if folder is None else load_model(str(folder))[0]
        res = measure_long_context(model, tok, opts, label, windows=windows)
        results.append(res)
        row = {"name": label, **res.as_dict()}
        for dom, data in (("pydocs-valid", str(VALID)), ("domain2", args.domain2)):
            if folder is not None and Path(data).is_file():
                s = evaluate(str(folder), data, reference=SOURCE, max_tokens=args.short_tokens, progress=False, model=model, reference_model=ref)
                row[f"{dom}_ppl512_ratio"] = s.ppl / s.reference_ppl
        rows.append(row)
        print(markdown(results), flush=True)
    summary = {"student": str(student), "tokens": trained[-1]["tokens"], "seq_len": lengths, "stage_tokens": budget,
               "retrieval": args.retrieval, "retrieval_far": args.retrieval_far,
               "retrieval_asks": args.retrieval_asks, "retrieval_facts": args.retrieval_facts,
               "answer_weight": args.answer_weight,
               "lead_weight": args.lead_weight, "answer_ce": args.answer_ce, "seed": args.seed,
               "lr": args.lr, "schedule_span": args.schedule_span, "trainable": args.trainable, "gradient_checkpointing": args.gradient_checkpointing, "train_seconds": train_secs,
               "tokens_per_s": sorted(m["tokens_per_s"] for m in trained)[len(trained) // 2],
               "last8": last_steps_mean(trained, 8), "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(results) + "\n| model | 512-window ppl ratio, pydocs-valid | second domain |\n|---|---:|---:|\n"
    for r in rows[1:]:
        md += f"| {r['name']} | {r.get('pydocs-valid_ppl512_ratio', float('nan')):.2f}x | {r.get('domain2_ppl512_ratio', float('nan')):.2f}x |\n"
    (out / "results.md").write_text(md)
    heatmap_png(results, out / "long_context.png", title=f"{name}: before and after {trained[-1]['tokens']:,} tokens of distillation at {args.seq_len}")
    print(md)
    print(f"trained {trained[-1]['tokens']:,} tokens in {train_secs / 60:.1f} min; last 8 steps' mean "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["last8"].items() if v is not None)
          + f"; wrote {out}/results.{{json,md}}, long_context.png")


def last_steps_mean(trained: list[dict], n: int) -> dict[str, float | None]:
    """The last ``n`` steps' mean loss, KL and answer CE (None where a step logged none): the end of
    training, less noisy than its last step."""
    out = {}
    for k in ("loss", "kl", "answer_ce"):
        vals = [m[k] for m in trained[-n:] if m.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


if __name__ == "__main__":
    main()
