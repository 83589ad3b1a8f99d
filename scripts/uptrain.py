#!/usr/bin/env python
"""Run an uptraining recipe; the same runner as `kvsurgeon uptrain`.

    python scripts/uptrain.py --recipe recipes/smollm2-mqa.yaml [--resume] [key=value ...]
    accelerate launch --config_file recipes/accelerate/fsdp.yaml scripts/uptrain.py --recipe recipes/llama3-8b-mla.yaml
    # two processes on a machine without GPUs (`accelerate launch --cpu` would start only one):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/uptrain.py --recipe R.yaml
"""

from __future__ import annotations

import argparse
import sys

from kvsurgeon.convert.errors import KvSurgeonError
from kvsurgeon.convert.train.recipe import load_recipe
from kvsurgeon.convert.train.uptrain import uptrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 stages.0.tokens=100000")
    args = ap.parse_args()
    try:
        recipe, text = load_recipe(args.recipe, args.overrides)
        final = uptrain(recipe, text, resume=args.resume)
    except KvSurgeonError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130 if str(e).startswith("interrupted") else 2)
    print(f"done: {final}")


if __name__ == "__main__":
    main()
