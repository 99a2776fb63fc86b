"""memlearner-client installs on its own: ``pip install ./memlearner_client`` into a fresh venv brings aiohttp and
tqdm, never torch or ComfyUI, and the command runs. Installs from the package registry (about 10-30 s)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import host

CLIENT = host.ROOT / "memlearner_client"
HEAVY = {"torch", "torchvision", "comfyui", "comfyui-memlearner", "numpy", "safetensors"}


def third_party_imports(folder: Path) -> set[str]:
    """Top-level modules the client's sources import that are neither its own nor the standard library's."""
    names = set()
    for path in folder.glob("*.py"):
        for m in re.finditer(r"^(?:from|import) ([A-Za-z_]\w*)", path.read_text(), re.M):
            names.add(m.group(1))
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("memlearner_client", "__future__")}


def test_client_distribution_declares_what_the_client_imports():
    meta = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    pack = tomllib.loads((host.ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ;\[]", d)[0].lower() for d in meta["dependencies"]}
    assert declared == third_party_imports(CLIENT) == {"aiohttp", "tqdm"}
    assert meta["version"] == pack["version"]
    assert meta["scripts"] == {"memlearner-client": pack["scripts"]["memlearner-client"]}


@pytest.mark.registry
@pytest.mark.timeout(240)
def test_client_installs_alone_without_torch(tmp_path):
    if os.environ.get("MEMLEARNER_TEST_OFFLINE"):
        pytest.skip("MEMLEARNER_TEST_OFFLINE is set: this test installs from the package registry")
    src = tmp_path / "src"  # a copy: pip builds in the source folder, which must stay clean
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=200)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert {"memlearner-client", "aiohttp", "tqdm"} <= installed
    assert not installed & HEAVY, f"the client pulled in {sorted(installed & HEAVY)}"
    run = subprocess.run([str(venv / "bin" / "memlearner-client"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "usage: memlearner-client" in run.stdout, run.stderr
