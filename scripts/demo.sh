#!/usr/bin/env bash
# README command 1: set up a fresh machine, fetch the real SmolLM2 fixture, convert it, evaluate, print the table.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
python scripts/demo.py "$@"
