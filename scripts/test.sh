#!/usr/bin/env bash
# Test command: set up the host (first run only), lint, and run the whole suite in a real ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_host.sh >/dev/null
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest tests -p no:cacheprovider "$@"
