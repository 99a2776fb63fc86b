#!/usr/bin/env bash
# Test command: set up the host (first run only), lint, and run the whole suite in a real ComfyUI (0.3.75); then,
# when ../shared/hosts/ has it, the tests whose behaviour depends on the host again on ComfyUI 0.12.1.
# Arguments go to the first pytest run only, and skip the second host.
set -euo pipefail
cd "$(dirname "$0")/.."

# The second test host: ComfyUI 0.12.1 (comfy-kitchen's kernels, current hooks), in its own folder and venv, set up
# by setup_host.sh from the archive. SECOND_HOST_TESTS is the one list of what runs there: the hooks and attention
# (query and reference memory, the host-version checks, RoPE gradients, the memory estimate), training, and the
# inference workflows through the real server. Files of the list that do not exist are left out.
SECOND_HOST_ARCHIVE=${MEMLEARNER_SECOND_HOST_ARCHIVE:-../shared/hosts/comfyui-0.12.1-fe251146.tar.gz}
SECOND_HOST_PATH=$PWD/.host/ComfyUI-0.12.1
SECOND_HOST_VENV=$PWD/.venv-comfy0.12
SECOND_HOST_TESTS=(
  tests/test_host_compat.py tests/test_host_hooks.py tests/test_query_memory.py tests/test_reference_memory.py
  tests/test_training.py tests/test_train_cli.py
  tests/test_host.py tests/test_workflows.py tests/test_rollout.py tests/test_model_management.py
)
bash scripts/setup_host.sh >/dev/null
.venv/bin/python -m ruff check .
# The browser test drives Debian's chromium: install it on a bare machine (as root, with apt); without it
# that test skips.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt_log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$apt_log" 2>&1; then
    echo "[test] warning: could not install chromium, the browser test will skip:" >&2
    tail -n 5 "$apt_log" >&2
  fi
  rm -f "$apt_log"
fi
rc=0
.venv/bin/python -m pytest tests -p no:cacheprovider "$@" || rc=$?

if [ $# -gt 0 ]; then
  echo "[test] second host (ComfyUI 0.12.1) skipped: arguments given, they run on the first host only"
elif [ ! -f "$SECOND_HOST_ARCHIVE" ]; then
  echo "[test] second host (ComfyUI 0.12.1) skipped: no $SECOND_HOST_ARCHIVE on this machine"
else
  start=$(date +%s)
  COMFYUI_PATH=$SECOND_HOST_PATH COMFYUI_ARCHIVE=$SECOND_HOST_ARCHIVE MEMLEARNER_VENV=$SECOND_HOST_VENV \
    bash scripts/setup_host.sh >/dev/null
  files=()
  for f in "${SECOND_HOST_TESTS[@]}"; do if [ -f "$f" ]; then files+=("$f"); fi; done
  echo "[test] second host: ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SECOND_HOST_PATH/comfyui_version.py"), ${#files[@]} test files"
  COMFYUI_PATH=$SECOND_HOST_PATH "$SECOND_HOST_VENV/bin/python" -m pytest "${files[@]}" -p no:cacheprovider || rc=$?
  echo "[test] second host: $(( $(date +%s) - start )) s including setup"
fi
exit $rc
