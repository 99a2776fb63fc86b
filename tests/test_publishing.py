"""The pack passes ``comfy node validate``, the check the Comfy Registry's publish action runs (pyproject's
[project] and [tool.comfy], then ruff's security rules: no exec, eval or two statements on a line). Installs
comfy-cli from the package registry into a fresh venv (about 40 s with a warm pip cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import host


@pytest.mark.registry
@pytest.mark.timeout(600)
def test_comfy_node_validate_passes(tmp_path):
    if os.environ.get("MEMLEARNER_TEST_OFFLINE"):
        pytest.skip("MEMLEARNER_TEST_OFFLINE is set: this test installs comfy-cli from the package registry")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "comfy-cli"],
                         capture_output=True, text=True, timeout=500)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "COLUMNS": "200"}  # comfy-cli's settings go to the temporary home, not the user's
    run = subprocess.run([str(venv / "bin" / "comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                         cwd=host.ROOT, capture_output=True, text=True, env=env, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "All validation checks passed" in out and "Security warnings" not in out, out
