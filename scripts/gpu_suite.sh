#!/usr/bin/env bash
# The test suite on a lent GPU machine, in ComfyUI's GPU mode, once per VRAM mode named (default: normal):
#   bash scripts/gpu_suite.sh normal lowvram novram [-- extra pytest arguments]
# Each run leaves its log in $MEMLEARNER_GPU_LOG_DIR (default tests/gpu_results/, see tests/gpu_log.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu_setup.sh
modes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do modes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#modes[@]} -gt 0 ] || modes=(normal)
status=0
for mode in "${modes[@]}"; do
  if [ "$mode" = normal ]; then unset MEMLEARNER_TEST_VRAM; else export MEMLEARNER_TEST_VRAM=$mode; fi
  # the machine reaches no package registry: the tests that install from it are left out
  MEMLEARNER_TEST_GPU=1 MEMLEARNER_TEST_OFFLINE=1 python3 -m pytest tests -p no:cacheprovider -m "not registry" "$@" \
    || status=$?
done
exit $status
