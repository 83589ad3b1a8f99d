"""Which layers to keep global when windowing most of them: greedy end-to-end selection vs the
per-layer ranking ``--global-layers auto`` uses (each layer windowed alone, its own attention error).

The model is the source in the sliding-window output class, with ``layer_types`` switched between
forwards. Score of a global set: KL(source || windowed) at the last ``--tail`` positions of retrieval
windows (a fact stated early, restated at the end; pydocs-train, never pydocs-valid). Candidates: the
top ``--candidates`` of the per-layer ranking (``kvsurgeon_window_ranking.json`` of an auto conversion).
``--mode add``: start from no global layer, add the candidate that lowers the score most, ``--keep``
times. ``--mode prune``: start from all candidates global, window the one whose loss costs least, until
``--keep`` remain (the regime the answer lives in, so fewer early choices made among broken models).

    python scripts/experiments/swa_greedy.py runs/bench-long-swa/swa512-25auto --keep 8 --candidates 16 --mode prune

Prints one JSON line per step and the chosen set, to pass as ``--global-layers``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_common import SOURCE, TRAIN  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("auto_folder", help="an --global-layers auto swa conversion (its ranking file and config)")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--mode", choices=["add", "prune"], default="prune")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from kvsurgeon.convert.evaluation.perplexity import kl_per_position, load_tokenizer
    from kvsurgeon.convert.greedy import prune_greedily
    from kvsurgeon.convert.io.resolve import resolve_model
    from kvsurgeon.convert.pipeline.calibration import CalibConfig, calibration_ids
    from kvsurgeon.convert.swa.search import set_global_layers, tail_logprobs

    folder = Path(args.auto_folder)
    ranking = json.loads((folder / "kvsurgeon_window_ranking.json").read_text())["ranking"]
    candidates = [r["layer"] for r in ranking[: args.candidates]]
    src = resolve_model(SOURCE)
    tok = load_tokenizer(src)
    ids = calibration_ids(tok, CalibConfig(str(TRAIN), args.windows * args.seq_len, args.seq_len, retrieval=1.0))
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    target = tail_logprobs(ref, ids, args.tail)
    del ref
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config.layer_types = list(model.config.layer_types)

    def score(globals_: set[int]) -> float:
        set_global_layers(model, globals_)
        lp = tail_logprobs(model, ids, args.tail)
        return float(kl_per_position(target, lp).mean())

    t0 = time.time()
    # controls: every layer global must give the source back (KL ~ 0), none global the worst case
    everything = set(range(len(model.model.layers)))
    print(json.dumps({"set": "all global", "kl": round(score(everything), 7)}), flush=True)
    print(json.dumps({"set": "none global", "kl": round(score(set()), 5)}), flush=True)
    ranked = set(r["layer"] for r in ranking[: args.keep])
    print(json.dumps({"set": "ranking top", "layers": sorted(ranked), "kl": round(score(ranked), 5)}), flush=True)

    def report(step: int, key: str, layer: int, kl: float, chosen, trials: dict) -> None:
        print(json.dumps({"step": step, key: layer, "kl": round(kl, 5), "layers": sorted(chosen),
                          "trials": {str(k): round(v, 4) for k, v in sorted(trials.items())},
                          "seconds": round(time.time() - t0)}), flush=True)

    if args.mode == "prune":
        chosen = set(candidates)
        print(json.dumps({"set": "start", "layers": sorted(chosen), "kl": round(score(chosen), 5)}), flush=True)
        chosen = set(prune_greedily(chosen, args.keep, score, on_step=lambda s: report(
            len(candidates) - len(s.kept), "window", s.dropped, s.result, s.kept, s.trials)).kept)
    else:  # forward: add the candidate that lowers the score most
        chosen = set()
        for step in range(1, args.keep + 1):
            trials = {c: score(chosen | {c}) for c in candidates if c not in chosen}
            best = min(trials, key=trials.get)
            chosen.add(best)
            report(step, "add", best, trials[best], chosen, trials)
    print("--global-layers " + ",".join(map(str, sorted(chosen))))


if __name__ == "__main__":
    main()
