#!/usr/bin/env bash
# Test command: set up the host (first run only), lint, and run the whole suite in a real ComfyUI (0.3.75); then,
# for each archive ../shared/hosts/ has, the tests whose behaviour depends on the host again on ComfyUI 0.12.1 and
# 0.33. Arguments go to the first pytest run only, and skip the other hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

# The other test hosts: ComfyUI 0.12.1 (comfy-kitchen's kernels, current hooks) and 0.33 (the newest to be had:
# torchaudio at import, ComfyUI's own RoPE wrapper, V3 dynamic combos in the stock video nodes), each in its own
# folder and a venv that shares the first host's torch (MEMLEARNER_BASE_VENV: 0.5-0.9 GB each instead of 7), set
# up by setup_host.sh from its archive. HOST_TESTS is the one list of what runs there: the hooks
# and attention (query and reference memory, the host-version checks, RoPE gradients, the memory estimate), training,
# the inference workflows through the real server, and the UI workflows in that host's own frontend. Files of the
# list that do not exist are left out.
OTHER_HOSTS=(  # version|archive
  "0.12.1|${MEMLEARNER_SECOND_HOST_ARCHIVE:-../shared/hosts/comfyui-0.12.1-fe251146.tar.gz}"
  "0.33|${MEMLEARNER_THIRD_HOST_ARCHIVE:-../shared/hosts/comfyui-0.33.0-783545f6.tar.gz}"
)
HOST_TESTS=(
  tests/test_host_compat.py tests/test_host_hooks.py tests/test_query_memory.py tests/test_reference_memory.py
  tests/test_reference_memory_wan22.py tests/test_rollout_experts.py tests/test_learned_policy.py
  tests/test_training.py tests/test_train_cli.py
  tests/test_host.py tests/test_workflows.py tests/test_rollout.py tests/test_model_management.py tests/test_browser.py
)
disk_free() { echo "[test] disk free $1: $(df -h --output=avail . | tail -n 1 | tr -d ' ')"; }
disk_free "before setup"
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
.venv/bin/python -m pytest tests -p no:cacheprovider --durations=25 "$@" || rc=$?
disk_free "after the first host"

for entry in "${OTHER_HOSTS[@]}"; do
  version=${entry%%|*} archive=${entry#*|}
  host_path=$PWD/.host/ComfyUI-$version host_venv=$PWD/.venv-comfy$version
  if [ $# -gt 0 ]; then
    echo "[test] ComfyUI $version skipped: arguments given, they run on the first host only"
    continue
  elif [ ! -f "$archive" ]; then
    echo "[test] ComfyUI $version skipped: no $archive on this machine"
    continue
  fi
  start=$(date +%s)
  COMFYUI_PATH=$host_path COMFYUI_ARCHIVE=$archive MEMLEARNER_VENV=$host_venv MEMLEARNER_BASE_VENV=$PWD/.venv \
    bash scripts/setup_host.sh >/dev/null
  files=()
  for f in "${HOST_TESTS[@]}"; do if [ -f "$f" ]; then files+=("$f"); fi; done
  echo "[test] ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$host_path/comfyui_version.py"): ${#files[@]} test files"
  COMFYUI_PATH=$host_path "$host_venv/bin/python" -m pytest "${files[@]}" -p no:cacheprovider --durations=15 || rc=$?
  echo "[test] ComfyUI $version: $(( $(date +%s) - start )) s including setup"
  disk_free "after ComfyUI $version"
done
exit $rc
