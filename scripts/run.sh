#!/usr/bin/env bash
# Main job: set up the host (first run only) and run the shipped memory workflow headless.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_host.sh >/dev/null
exec .venv/bin/python scripts/demo.py "$@"
