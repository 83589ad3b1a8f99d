"""Is it the slow RoPE frequencies MLA drops that cost retrieval at 4K, or the latent?

MLA's shared rope key keeps only the Dr/2 fastest of the source's rotary frequencies (DeepseekV3's RoPE is one
geometric series); the rest become nope dims that no longer rotate. On SmolLM2 (theta 1e5, 32 frequencies) the
fastest dropped at Dr=48 turns 1.8e-4 rad per token: 0.09 rad over 512 tokens, which a 512-token calibration
cannot see, but 0.73 rad over 4K. This probe takes that step alone, with nothing else changed: the *source*,
its frequencies from index Dr/2 on set to zero (no rotation; the layer is otherwise exact), measured on
passkey and multikey at 1K/2K/4K (the bench's prompts, seed 0, and 20 fresh ones per length, seed 1) and on
perplexity by position (2 windows of 4,096 of the last 200 pydocs-train documents, never pydocs-valid).

    python scripts/experiments/rope_drop_probe.py --keep 24 --keep 16     # Dr=48 (R48/Dr48) and Dr=32 (R64/Dr32)

One JSON line per model (the source first), and runs/rope-drop-probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import ROOT, SOURCE, ablation_eval_file  # noqa: E402

OUT = ROOT / "runs" / "rope-drop-probe.json"


def unrotate_from(model, keep: int) -> None:
    """Stop every rotary frequency from index ``keep`` on (0 = fastest) turning: inv_freq set to 0 there."""
    rot = model.model.rotary_emb
    rot.inv_freq[keep:] = 0.0
    if hasattr(rot, "original_inv_freq"):
        rot.original_inv_freq = rot.inv_freq.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, action="append", default=[], help="frequencies kept rotating (Dr/2)")
    args = ap.parse_args()
    import torch

    from kvsurgeon.convert.evaluation.long_context import LongContextOptions, long_ppl_windows, measure_long_context
    from kvsurgeon.convert.evaluation.perplexity import load_model, load_tokenizer
    from kvsurgeon.convert.io.resolve import resolve_model

    torch.set_num_threads(os.cpu_count() or 2)
    tok = load_tokenizer(resolve_model(SOURCE))
    rows = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with ablation_eval_file() as eval_path:
        bench = LongContextOptions(tasks=("passkey", "multikey", "long-ppl"), depths=5, samples=2, long_seq_len=4096,
                                   long_windows=2, data=eval_path)
        fresh = LongContextOptions(tasks=("passkey", "multikey"), depths=5, samples=4, seed=1)
        windows = long_ppl_windows(tok, bench)
        for keep in [None, *args.keep]:
            name = "source" if keep is None else f"keep{keep}"
            if name not in rows:
                model, _ = load_model(SOURCE)
                if keep is not None:
                    unrotate_from(model, keep)
                a = measure_long_context(model, tok, bench, name, progress=False, windows=windows)
                b = measure_long_context(model, tok, fresh, name, progress=False)
                rows[name] = {"passkey": a.passkey_by_length, "multikey": a.multikey_by_length,
                              "key_logprob": a.passkey_logprob_by_length, "long_ppl": a.long_ppl,
                              "buckets": a.long_ppl_buckets, "seed1_passkey": b.passkey_by_length,
                              "seed1_multikey": b.multikey_by_length, "seed1_key_logprob": b.passkey_logprob_by_length}
                OUT.write_text(json.dumps(rows, indent=1) + "\n")
            row = dict(rows[name])
            if keep is not None:
                row["long_ppl_ratio"] = [round(x / s, 3) for x, s in zip(row["long_ppl"], rows["source"]["long_ppl"])]
            print(json.dumps({"model": name, **row}), flush=True)


if __name__ == "__main__":
    main()
