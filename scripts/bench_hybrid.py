"""Hybrid benchmark on the real SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads of 64).

Converts to GraniteMoeHybrid with 50% and 75% of the attention layers as Mamba2, the layers chosen
``auto`` (measured KL cost) or evenly interleaved, right after the calibrated initialisation and after
attention transfer, and measures each on held-out text against the source:

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/bench_hybrid.py \
        --calib-tokens 16384 --eval-tokens 8192 --transfer-tokens 65536 --out /tmp/bench_hybrid

Calibration (initialisation, ranking, attention transfer) reads only pydocs-train; the numbers are
on pydocs-valid. A linear layer depends only on the source's activations, not on which other layers
are linear, so the layers are computed once and shared between the variants (``layer_cache``): the
"layer s" column is what the variant's linear layers cost when converted alone (init + transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kvsurgeon.attention.kv_cache import kv_bytes_per_token, summarize  # noqa: E402
from kvsurgeon.convert.pipeline.calibration import CalibConfig  # noqa: E402
from kvsurgeon.convert.io.checkpoint import read_config  # noqa: E402
from kvsurgeon.convert.evaluation.perplexity import evaluate, load_model  # noqa: E402
from kvsurgeon.convert.pipeline.driver import ConvertOptions, convert_model  # noqa: E402
from kvsurgeon.convert.io.resolve import resolve_model  # noqa: E402
from kvsurgeon.convert.hybrid.plan import RANKING_FILE, REPORT_FILE, hybrid_plan  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAIN = "/work/shared/data/pydocs-train.jsonl"
VALID = "/work/shared/data/pydocs-valid.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--calib", default=TRAIN)
    ap.add_argument("--eval", default=VALID)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank-tokens", type=int, default=2048)
    ap.add_argument("--transfer-tokens", type=int, default=65536, help="attention-transfer tokens per linear layer")
    ap.add_argument("--linear-fractions", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--choices", nargs="+", default=["auto", "even"])
    ap.add_argument("--stages", nargs="+", default=["init", "transfer"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/bench_hybrid")
    ap.add_argument("--keep-models", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_model(args.model)
    cfg = read_config(src)
    L = cfg["num_hidden_layers"]
    calib = CalibConfig(data=args.calib, tokens=args.calib_tokens, seq_len=args.seq_len)

    t0 = time.time()
    ref_model, _ = load_model(str(src))
    base = evaluate(str(src), args.eval, max_tokens=args.eval_tokens, seq_len=args.seq_len, model=ref_model, progress=False)
    rows = [{
        "variant": "source (attention everywhere)", "linear": 0, "ppl": base.ppl, "kl": 0.0, "top1": 1.0,
        "kv_bytes_per_token": kv_bytes_per_token(cfg), "state_bytes": 0, "convert_s": 0.0, "layer_s": 0.0,
    }]
    print(f"source: ppl {base.ppl:.3f} on {base.tokens} tokens ({time.time() - t0:.0f}s)", flush=True)

    layer_cache: dict = {}
    ranking = None
    for stage in args.stages:
        transfer = args.transfer_tokens if stage == "transfer" else 0
        for frac in args.linear_fractions:
            keep = 1.0 - frac
            for choice in args.choices:
                name = f"{int(round(frac * 100))}% linear, {choice}, {'init' if not transfer else f'transfer {transfer // 1024}K tok/layer'}"
                folder = out / f"smol-hybrid-{int(round(frac * 100))}-{choice}-{stage}"
                make_plan = hybrid_plan(
                    keep_attention=keep, linear_layers=choice, transfer_tokens=transfer, calib=calib,
                    rank_tokens=args.rank_tokens, ranking=ranking, layer_cache=layer_cache,
                    log=lambda s: print("   ", s, flush=True),
                )
                print(f"== {name}", flush=True)
                t1 = time.time()
                res = convert_model(str(src), make_plan, ConvertOptions(out=folder, overwrite=True, calib=calib, progress=False))
                convert_s = time.time() - t1
                if choice == "auto" and ranking is None:
                    ranking = json.loads((folder / RANKING_FILE).read_text())
                    for k in ("kept_attention", "linear_layers"):
                        ranking.pop(k, None)
                    shutil.copy(folder / RANKING_FILE, out / RANKING_FILE)
                report = json.loads((folder / REPORT_FILE).read_text())
                layer_s = sum(
                    info.get("init_seconds", 0) + info.get("transfer", {}).get("seconds", 0) for info in report["layers"].values()
                )
                ev = evaluate(
                    str(folder), args.eval, reference=str(src), max_tokens=args.eval_tokens, seq_len=args.seq_len,
                    reference_model=ref_model, progress=False,
                )
                row = {
                    "variant": name, "linear": len(report["linear_layers"]), "linear_layers": report["linear_layers"],
                    "ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1_agreement, "kv_bytes_per_token": kv_bytes_per_token(res.config),
                    "state_bytes": summarize(res.config)[0].fixed_bytes, "convert_s": convert_s, "layer_s": layer_s,
                    "mean_layer_rel_mse_init": _mean([i["rel_mse_init"] for i in report["layers"].values()]),
                    "mean_layer_val_rel_mse_after_transfer": _mean([i["transfer"]["val_rel_mse_after"] for i in report["layers"].values() if "transfer" in i]),
                }
                rows.append(row)
                print(f"   ppl {ev.ppl:.3f}  KL {ev.kl:.4f}  top-1 {ev.top1_agreement:.3f}  ({convert_s:.0f}s)", flush=True)
                (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
                if not args.keep_models:
                    shutil.rmtree(folder)
    print()
    print(table(rows, base.ppl))
    (out / "results.md").write_text(table(rows, base.ppl) + "\n")
    print(f"\ntotal {time.time() - t0:.0f}s; results in {out}/results.json, results.md, {RANKING_FILE}")


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def table(rows, base_ppl) -> str:
    head = "| variant | linear layers | ppl | ppl / source | KL | top-1 | KV bytes/token | fixed state bytes/seq | convert s | layer s |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['linear']}/30 | {r['ppl']:.2f} | {r['ppl'] / base_ppl:.2f}x | {r['kl']:.3f} | "
            f"{r['top1']:.3f} | {r['kv_bytes_per_token']} | {r['state_bytes']} | {r['convert_s']:.0f} | {r['layer_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
