# Sourced by the README commands: everything a fresh machine needs, idempotent and quick when done.
# - .venv with torch==2.13.0 installed FIRST and explicitly (a loose torch range pulls GBs of CUDA wheels)
# - the project (editable) with its dev extras
# - the real fixture model in the Hub cache, then offline mode for everything after
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "==> installing torch==2.13.0"
  pip install --quiet "torch==2.13.0"
fi
stamp=".venv/.kvsurgeon-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import kvsurgeon.convert" 2>/dev/null; then
  echo "==> installing kvsurgeon (editable, dev extras)"
  pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
echo "==> real fixture model"
python scripts/build_fixture.py
export HF_HUB_OFFLINE=1
