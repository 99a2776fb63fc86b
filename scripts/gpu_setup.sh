#!/usr/bin/env bash
# On a lent GPU machine, from the .device/ bundle (scripts/device_bundle.sh): installs the carried wheels and
# this pack into the image's own Python (python3, which holds PyTorch; the machine is bare and given back after),
# and unpacks ComfyUI where the tests look for it (.host/ComfyUI). Idempotent; needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .device/wheels ] || { echo "no .device/ bundle: run scripts/device_bundle.sh here and carry .device" >&2; exit 2; }
if ! python3 -c "import av, torchsde, sqlalchemy, alembic, pydantic_settings, memlearner_core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
if [ ! -f .host/ComfyUI/main.py ]; then
  mkdir -p .host && tar xzf .device/comfyui.tgz -C .host
fi
ln -sfn "$PWD" .host/ComfyUI/custom_nodes/comfyui-memlearner
python3 -c "import torch; print('[gpu_setup] torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" >&2
