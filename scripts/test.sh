#!/usr/bin/env bash
# README command 2: set up a fresh machine and run the test suite (CI runs exactly this).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/setup_vllm.sh"   # side venv for the vLLM parity tests (cached outside the repo)
python -m pytest -q "$@"
