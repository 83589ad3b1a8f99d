"""Which converted layers break long-context retrieval? Swap one layer's attention of a GQA/MQA
conversion into the source (its KV heads repeated back to the source's count: exact) and measure the
passkey answer log-probability and accuracy on generated prompts.

    python scripts/experiments/retrieval_layers.py runs/bench-long-base/mqa --length 1024 --samples 4
    python scripts/experiments/retrieval_layers.py runs/bench-long-base/mqa --layers 0-14   # a set at once

Prints one JSON line per layer (or set): answer log-prob mean, accuracy; the source first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_common import SOURCE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("converted")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4, help="prompts per depth (depths 25/50/75%)")
    ap.add_argument("--layers", default=None, help="swap this set at once, e.g. 0-14 or 3,7; default: each layer alone")
    args = ap.parse_args()

    from kvsurgeon.convert.evaluation.perplexity import load_model, load_tokenizer
    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, prompt_grid, score_prompts

    src, path = load_model(SOURCE)
    conv, _ = load_model(args.converted)
    tok = load_tokenizer(path)
    prompts = [p for p in prompt_grid(tok, LongContextOptions(lengths=(args.length,), depths=5, samples=args.samples), 1)
               if 0 < p.depth < 1]
    G = src.config.num_key_value_heads
    originals = {i: {k: v.clone() for k, v in l.self_attn.state_dict().items()} for i, l in enumerate(src.model.layers)}

    def swap(layers: list[int]) -> None:
        for i, l in enumerate(src.model.layers):
            sd = dict(originals[i])
            if i in layers:
                c = conv.model.layers[i].self_attn.state_dict()
                g = conv.config.num_key_value_heads
                for k, v in c.items():
                    if k.startswith(("k_proj", "v_proj")):  # repeat each KV head G/g times: exact (query h reads h // n_rep)
                        D = v.shape[0] // g
                        v = v.view(g, D, *v.shape[1:]).repeat_interleave(G // g, 0).reshape(G * D, *v.shape[1:])
                    sd[k] = v
            l.self_attn.load_state_dict(sd)

    def score(tag: str) -> None:
        rows = score_prompts(src, prompts, progress=False)
        print(json.dumps({"layers": tag, "logprob": round(sum(r["answer_logprob"] for r in rows) / len(rows), 3),
                          "acc": sum(r["retrieved"] for r in rows) / len(rows)}), flush=True)

    score("source")
    if args.layers:
        sets = []
        for part in args.layers.split(","):
            a, _, b = part.partition("-")
            sets += list(range(int(a), int(b) + 1)) if b else [int(a)]
        swap(sets)
        score(args.layers)
        return
    for i in range(len(src.model.layers)):
        swap([i])
        score(str(i))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
