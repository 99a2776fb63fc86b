"""The log a GPU run of the suite leaves behind (``tests/gpu_results/``): device, versions, what passed, peak memory.

Written at the end of every ``MEMLEARNER_TEST_GPU=1`` session into ``MEMLEARNER_GPU_LOG_DIR`` (default
``tests/gpu_results``), one markdown file per run, named ``<date>_<gpu>_<vram mode>.md``.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import host


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=host.ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _comfy_version() -> str:
    text = (host.comfy_path() / "comfyui_version.py").read_text()
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return found.group(1) if found else "unknown"


def _reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # skips: (file, line, reason)
        return str(report.longrepr[2])
    return str(getattr(report, "longreprtext", "") or report.longrepr).strip().splitlines()[-1][:300]


def write(terminalreporter, exitstatus: int) -> Path:
    stats = terminalreporter.stats
    reports = {k: [r for r in stats.get(k, []) if getattr(r, "nodeid", None)] for k in ("passed", "failed", "error", "skipped")}
    counts = ", ".join(f"{len(v)} {k}" for k, v in reports.items() if v) or "nothing ran"
    mode = host.vram_mode() or "normal"
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    gpu = props.name if props else "no CUDA device"
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# CUDA test run, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"- device: {gpu}" + (f", {props.total_memory / 2**20:.0f} MiB, compute capability {props.major}.{props.minor}"
                              if props else ""),
        f"- driver: {_run('nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader') or 'unknown'}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
        f"ComfyUI {_comfy_version()}, pack commit {_run('git', 'rev-parse', '--short', 'HEAD') or 'unknown'}",
        f"- ComfyUI mode: GPU, {mode} VRAM ({' '.join(host.comfy_flags()) or 'no flags'})",
        f"- command: pytest {' '.join(terminalreporter.config.invocation_params.args)}",
        f"- result: {counts}; exit status {int(exitstatus)}",
    ]
    if props:
        lines.append(f"- peak CUDA memory allocated by the in-process ComfyUI: "
                     f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB (server processes not counted)")
    for kind in ("failed", "error", "skipped"):
        if reports[kind]:
            lines += ["", f"## {kind.capitalize()}", ""]
            lines += [f"- `{r.nodeid}`: {_reason(r)}" for r in reports[kind]]
    slowest = sorted(reports["passed"] + reports["failed"], key=lambda r: r.duration, reverse=True)[:10]
    if slowest:
        lines += ["", "## Slowest", ""] + [f"- {r.duration:.1f} s `{r.nodeid}`" for r in slowest]
    folder = Path(os.environ.get("MEMLEARNER_GPU_LOG_DIR") or host.ROOT / "tests" / "gpu_results")
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    path = folder / f"{now:%Y-%m-%d}_{slug}_{mode}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
