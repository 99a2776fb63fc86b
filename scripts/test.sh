#!/usr/bin/env bash
# Test command: set up the host (first run only), lint, and run the whole suite in a real ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
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
exec .venv/bin/python -m pytest tests -p no:cacheprovider "$@"
