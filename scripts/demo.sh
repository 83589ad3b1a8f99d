#!/usr/bin/env bash
# README command 1: set up a fresh machine, fetch the real SmolLM2 fixture, convert it the
# recommended way in each family, measure each against the source, print the table.
# `bash scripts/demo.sh --help` lists the options (no set-up needed for that).
set -euo pipefail
cd "$(dirname "$0")/.."
for a in "$@"; do
  if [[ "$a" == "-h" || "$a" == "--help" ]]; then exec python3 scripts/demo.py --help; fi
done
source scripts/setup.sh
python scripts/demo.py "$@"
