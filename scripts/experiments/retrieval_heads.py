"""Does weighting the calibrated fit towards retrieval heads keep untrained MQA's (or MLA's) passkey retrieval?

Retrieval heads (DuoAttention; Wu et al. 2024, "Retrieval Head") are the few query heads that copy a
fact from far back. Each head's copy score is measured on the source alone: the attention that the
rows predicting a restated access code put on the code's first mention, in retrieval-pair windows of
pydocs-train text (calibration's own generator, documents the ablation eval never reads). The merge
then counts head h's errors ``1 + boost * score_h / max score`` times (``calibrated_merge(head_weights=...)``).

    python scripts/experiments/retrieval_heads.py scores [--scores pairs|repeats]   # per-head copy scores
    python scripts/experiments/retrieval_heads.py mqa --boost 0 --boost 30 [convert flags...]
    python scripts/experiments/retrieval_heads.py mqa --weight 500     # the CLI's own --retrieval-heads 500
    python scripts/experiments/retrieval_heads.py mla --weight 0 --weight 130 --kv-lora-rank 48 --rope-dim 48
    python scripts/experiments/retrieval_heads.py mla --weight 130 --token-heads ...   # token weights by head too
    python scripts/experiments/retrieval_heads.py mla --weight 130 --tuning kv_balance=2 ...   # any MlaTuning field

``--scores repeats`` (the default) needs no planted facts: a copy is any bigram of plain text repeated
from 64+ tokens back.

Scored like long_context_ablation.py: passkey at 1K/2K/4K (10 prompts per length), 512-window ppl ratio
and ppl ratio by position on the last 200 pydocs-train documents, never pydocs-valid. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kvsurgeon.convert.gqa.plan as to_gqa  # noqa: E402
from bench_common import ABLATION_DOCS, ROOT, SOURCE, TRAIN, ablation_eval_file  # noqa: E402
from mla_tools import tuning_overrides  # noqa: E402  (this folder)

OUT = ROOT / "runs" / "retrieval-heads"
WINDOWS, WINDOW = 16, 512


def _source_and_text(windows: int, seq_len: int):
    """The source with attention probabilities out, its tokenizer, and ``windows * seq_len`` tokens of the
    pydocs-train documents the ablation eval does not read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, attn_implementation="eager", dtype=torch.float32).eval()
    docs = [json.loads(line)["text"] for line in TRAIN.read_text().splitlines()[:-ABLATION_DOCS]]
    ids: list[int] = []
    for d in docs:
        ids += tok(d + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= windows * seq_len:
            break
    return tok, model, ids


def copy_scores(windows: int = WINDOWS, seq_len: int = WINDOW) -> torch.Tensor:
    """(layers, heads): mean attention from each restated code token's predicting row to the same token's
    first mention, on ``windows`` retrieval-pair windows of pydocs-train text."""
    from kvsurgeon.convert.pipeline.calibration import retrieval_window_with_answer

    tok, model, ids = _source_and_text(windows, seq_len)
    rng = random.Random(0)
    cfg = model.config
    total, n = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads), 0
    for w in range(windows):
        win, spans = retrieval_window_with_answer(tok, ids[w * seq_len:(w + 1) * seq_len], rng)
        if not spans:
            continue
        span = spans[0]
        code = win[span.start:span.stop]
        first = next(i for i in range(span.start - len(code)) if win[i:i + len(code)] == code)
        with torch.no_grad():
            att = model(torch.tensor([win]), output_attentions=True).attentions
        for j in range(len(code)):
            for layer, a in enumerate(att):
                total[layer] += a[0, :, span.start - 1 + j, first + j]
            n += 1
    return total / n


def repeat_scores(windows: int = WINDOWS, seq_len: int = WINDOW, far: int = 64) -> torch.Tensor:
    """(layers, heads): the same on plain pydocs-train windows, no planted facts. A copy is a row t whose
    next token repeats a bigram seen at least ``far`` tokens back (ids[s-1:s+1] == ids[t:t+2], the
    nearest such s): the attention a(t, s) on that earlier copy, averaged over every such row."""
    from kvsurgeon.convert.retrieval_heads import repeat_pairs

    _, model, ids = _source_and_text(windows, seq_len)
    cfg = model.config
    total, n = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads), 0
    for w in range(windows):
        win = ids[w * seq_len:(w + 1) * seq_len]
        pairs = repeat_pairs(torch.tensor([win]), far)  # the CLI's own definition of a far repeat
        if not len(pairs):
            continue
        rows, cols = pairs[:, 1], pairs[:, 2]
        with torch.no_grad():
            att = model(torch.tensor([win]), output_attentions=True).attentions
        for layer, a in enumerate(att):
            total[layer] += a[0][:, rows, cols].sum(-1)
        n += len(pairs)
    return total / n


def scores(kind: str = "pairs") -> torch.Tensor:
    path = OUT / f"{kind}_scores.pt"
    if not path.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(copy_scores() if kind == "pairs" else repeat_scores(), path)
    return torch.load(path, weights_only=True)


def cli_convert(out: Path, argv: list[str], to: str = "mqa", tuning: dict | None = None) -> float:
    """``kvsurgeon convert SOURCE --to TO ARGV`` into ``out``; seconds taken. ``tuning``: ``MlaTuning`` fields
    to override for an MLA conversion (e.g. ``token_heads``: the token weights count each head by its
    retrieval weight too); none of them is a CLI flag."""
    import dataclasses

    import kvsurgeon.convert.mla.plan as to_mla
    from kvsurgeon.convert.cli import app

    layer = to_mla._calibrated_layer
    if tuning:
        to_mla._calibrated_layer = lambda shape, q_bias, t, heads=None: layer(
            shape, q_bias, dataclasses.replace(t, **tuning), heads)
    t0 = time.time()
    try:
        app(["convert", SOURCE, "--to", to, *argv, "--out", str(out), "--overwrite", "--measure", "off"], standalone_mode=False)
    finally:
        to_mla._calibrated_layer = layer
    return time.time() - t0


def convert(out: Path, boost: float, kind: str, flags: list[str]) -> float:
    """MQA with head weights ``1 + boost * score / max score``, via the CLI; seconds taken."""
    s = scores(kind)
    weights = 1 + boost * s / s.max()
    layer = iter(range(weights.shape[0]))  # calibrated_merge is called once per layer, in order
    merge = to_gqa.calibrated_merge

    def weighted(attn, x, target, options, **kw):
        kw["head_weights"] = weights[next(layer)]  # in place of the plan's own (None at --retrieval-heads 0)
        return merge(attn, x, target, options, **kw)

    to_gqa.calibrated_merge = weighted
    try:
        return cli_convert(out, flags)
    finally:
        to_gqa.calibrated_merge = merge


def evaluate(out: Path) -> dict:
    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, measure_long_context
    from kvsurgeon.convert.evaluation.perplexity import evaluate as ppl, load_model, load_tokenizer

    model, path = load_model(str(out))
    tok = load_tokenizer(path)
    with ablation_eval_file() as eval_path:
        opts = LongContextOptions(tasks=("passkey", "long-ppl"), lengths=[1024, 2048, 4096], samples=2,
                                  long_seq_len=4096, long_windows=2, data=eval_path)
        lc = measure_long_context(model, tok, opts, out.name, progress=False)
        short = ppl(str(out), eval_path, reference=SOURCE, max_tokens=4096, progress=False, model=model)
        cache = OUT / "source_long_ppl.json"
        if not cache.is_file():
            ref, _ = load_model(SOURCE)
            src = measure_long_context(ref, tok, opts, "source", progress=False)
            cache.write_text(json.dumps({"long_ppl": src.long_ppl, "passkey": src.passkey_by_length}))
        src = json.loads(cache.read_text())
    return {"passkey": lc.passkey_by_length, "key_logprob": lc.passkey_logprob_by_length,
            "ppl512_ratio": round(short.ppl / short.reference_ppl, 3),
            "long_ppl_ratio": [round(a / b, 3) for a, b in zip(lc.long_ppl, src["long_ppl"])],
            "buckets": lc.long_ppl_buckets, "source_passkey": src["passkey"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=["scores", "mqa", "mla"], help="per-head scores, or the conversion to run")
    ap.add_argument("--boost", type=float, action="append", default=[])
    ap.add_argument("--weight", type=float, action="append", default=[],
                    help="convert with the CLI's --retrieval-heads W (scores from the calibration text itself)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--token-heads", action="store_true",
                    help="mla job: weight MLA's token weights by the same head weights (MlaTuning.token_heads)")
    ap.add_argument("--tuning", action="append", default=[], metavar="FIELD=VALUE",
                    help="mla job: override an MlaTuning field, e.g. kv_balance=2 (repeatable)")
    ap.add_argument("--scores", choices=["pairs", "repeats"], default="repeats")
    args, flags = ap.parse_known_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.job == "scores":
        s = scores(args.scores)
        top = torch.topk(s.flatten(), 12)
        print(json.dumps([(int(i) // s.shape[1], int(i) % s.shape[1], round(float(v), 3))
                          for v, i in zip(top.values, top.indices)]))
        return
    if args.job == "mla" and (args.boost or not args.weight):
        ap.error("the mla job converts with --weight W (the CLI's --retrieval-heads); --boost patches the KV-head merge")
    if (args.token_heads or args.tuning) and args.job != "mla":
        ap.error("--token-heads and --tuning change MLA's fit; they need the mla job")
    tuning = tuning_overrides(args.tuning) | ({"token_heads": True} if args.token_heads else {})
    th = "-th" if tuning.get("token_heads") else ""  # the folder names every override: a named folder is only measured
    th += "".join(f"-{k.replace('_', '')}{v if v is None else format(v, 'g')}"
                  for k, v in tuning.items() if k != "token_heads")
    runs = [(OUT / f"{args.job}-cli-w{w:g}{th}{args.tag}", {"weight": w, **tuning},
             lambda out, w=w: cli_convert(out, ["--retrieval-heads", str(w), *flags], args.job, tuning))
            for w in args.weight]
    runs += [(OUT / f"mqa-{args.scores}-b{b:g}{args.tag}", {"boost": b},
              lambda out, b=b: convert(out, b, args.scores, flags)) for b in args.boost or ([] if args.weight else [0.0])]
    for out, what, make in runs:  # a folder an earlier run converted is only measured
        secs = make(out) if not (out / "config.json").is_file() else None
        print(json.dumps({"run": out.name, **what, "flags": flags, "convert_s": secs and round(secs), **evaluate(out)}),
              flush=True)


if __name__ == "__main__":
    main()
