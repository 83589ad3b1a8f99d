"""Does attention transfer help a Mamba2 layer at small budgets? For chosen layers of the real SmolLM2:
the calibrated initialisation the CLI writes, then ``attention_transfer`` at each learning rate and step
count, never undone (``restore_if_worse=False``), so the held-out error training reaches is printed.

    python scripts/experiments/transfer_budget.py TOKENS LAYERS LRS STEPS
    python scripts/experiments/transfer_budget.py 8192 2,14 3e-4,1e-4,3e-5,1e-5 8,32

Calibration as the CLI's hybrid default on pydocs-train: TOKENS tokens in 512-token windows, half of them
with retrieval pairs; the last 1/8 of the windows are held out (as in the conversion).
"""

from __future__ import annotations

import argparse
import copy

import torch

from kvsurgeon.attention import read_attention
from kvsurgeon.attention.hybrid_layout import granite_hybrid_config, mamba2_dims
from kvsurgeon.attention.reference import attention_output
from kvsurgeon.convert.evaluation.perplexity import load_tokenizer
from kvsurgeon.convert.hybrid.fit import attention_transfer, mamba2_from_attention, mamba2_module
from kvsurgeon.convert.io.checkpoint import LazyCheckpoint, read_config
from kvsurgeon.convert.io.resolve import resolve_model
from kvsurgeon.convert.pipeline.calibration import CalibConfig, LayerStream, calibration_ids

TRAIN = "/work/shared/data/pydocs-train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens", type=int)
    ap.add_argument("layers", help="comma-separated layer indices")
    ap.add_argument("lrs", help="comma-separated learning rates")
    ap.add_argument("steps", help="comma-separated step counts")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    args = ap.parse_args()
    layers = [int(s) for s in args.layers.split(",")]
    lrs = [float(s) for s in args.lrs.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]

    src = resolve_model(args.model)
    cfg, ckpt = read_config(src), LazyCheckpoint(src)
    linear_cfg = granite_hybrid_config(cfg, list(range(cfg["num_hidden_layers"])))
    ids = calibration_ids(load_tokenizer(src), CalibConfig(data=TRAIN, tokens=args.tokens, seq_len=512, retrieval=0.5))
    for i, x in LayerStream(ckpt, cfg, ids):
        if i in layers:
            attn = read_attention(ckpt, cfg, i).to(torch.float32)
            y = attention_output(attn, x).to(torch.float32)
            w, _ = mamba2_from_attention(attn, x, mamba2_dims(linear_cfg), eps=float(cfg["rms_norm_eps"]), target=y)
            base = mamba2_module(linear_cfg, i, w)
            for steps in steps_list:
                for lr in lrs:
                    r = attention_transfer(copy.deepcopy(base), x, y, steps, lr, restore_if_worse=False)
                    print(f"layer {i} steps {steps} lr {lr:g}: held-out {r.val_rel_mse_before:.4f} -> "
                          f"{r.val_rel_mse_after:.4f}, train {r.train_rel_mse_after:.4f} ({r.seconds:.0f}s)", flush=True)
        if i >= max(layers):
            break


if __name__ == "__main__":
    main()
