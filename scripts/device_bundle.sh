#!/usr/bin/env bash
# Pack what a lent GPU machine lacks into .device/ (ignored by git; name it in the device run's `carry`).
# That machine reaches no package registry and has its own Python 3.12 with PyTorch: it gets ComfyUI as a
# tarball and wheels, for its Python, of the ComfyUI requirements its image does not have, at the versions of
# this machine's test environment. Run here, after scripts/setup_host.sh. About 50 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY=$(bash scripts/setup_host.sh)
PY=.venv/bin/python
# Not in the GPU image: the video reader ComfyUI's API imports (av), its sampler noise (torchsde), its database
# (alembic, SQLAlchemy), its settings (pydantic); the trainer's accelerate (and its psutil). The frontend package is
# not needed: the tests serve no UI there. diffusers is not carried: its tests say they skip there.
NAMES='av|torchsde|trampoline|alembic|mako|sqlalchemy|greenlet|pydantic|pydantic_core|pydantic-settings|annotated-types|typing-inspection|python-dotenv|accelerate|psutil'
pins=$($PY -m pip freeze | grep -iE "^($NAMES)==")
rm -rf .device && mkdir -p .device/wheels
$PY -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .device/wheels $pins
name=$(basename "$COMFY")
tar czf .device/comfyui.tgz -C "$(dirname "$COMFY")" --exclude="$name/custom_nodes/comfyui-memlearner" \
  --exclude="$name/tests" --exclude="$name/tests-unit" --exclude=__pycache__ "$name"
du -sh .device >&2
