"""A real ComfyUI with this pack: imported in-process (library use) or started as its HTTP server.

The ComfyUI is the one ``scripts/setup_host.sh`` prepared (``.host/ComfyUI``), or ``COMFYUI_PATH``.
It runs with ``--cpu`` unless ``MEMLEARNER_TEST_GPU=1``, with ``MEMLEARNER_TEST_VRAM=lowvram|novram`` for
ComfyUI's low-VRAM modes; ``ComfyServer`` also takes its flags explicitly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NODE_IDS = {"MemLearnerLoadMemoryEncoder", "MemLearnerEncodeReferenceVideo", "MemLearnerReferenceMemoryBank",
                 "MemLearnerApplyQueryMemory", "MemLearnerApplyReferenceMemory", "MemLearnerMemoryRollout"}


def comfy_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".host" / "ComfyUI")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {path}: run `bash scripts/setup_host.sh` (or set COMFYUI_PATH)")
    return path


def use_gpu() -> bool:
    return os.environ.get("MEMLEARNER_TEST_GPU", "") == "1"


def vram_mode() -> str | None:
    """``MEMLEARNER_TEST_VRAM``: ``lowvram`` or ``novram`` runs ComfyUI with that flag (GPU runs only)."""
    mode = os.environ.get("MEMLEARNER_TEST_VRAM", "") or None
    if mode not in (None, "lowvram", "novram"):
        raise RuntimeError(f"MEMLEARNER_TEST_VRAM must be lowvram or novram, got {mode!r}")
    if mode and not use_gpu():
        raise RuntimeError("MEMLEARNER_TEST_VRAM needs a GPU run (MEMLEARNER_TEST_GPU=1)")
    return mode


def comfy_flags() -> list[str]:
    """ComfyUI command-line flags for this run: ``--cpu`` without a GPU, else the VRAM mode, if any."""
    if not use_gpu():
        return ["--cpu"]
    mode = vram_mode()
    return [f"--{mode}"] if mode else []


def write_extra_paths(models_dir: Path, path: Path, custom_nodes: Iterable[Path] = ()) -> Path:
    """An extra_model_paths.yaml pointing ComfyUI at a models folder (the default for new files) and at extra
    custom-node folders, if any."""
    names = ["diffusion_models", "vae", "memory_encoders", "memlearner", "loras"]
    lines = ["memlearner_models:", f"  base_path: {models_dir}", "  is_default: true"]
    lines += [f"  {n}: {n}/" for n in names]
    folders = [str(Path(f).resolve()) for f in custom_nodes]
    if folders:
        lines += ["  custom_nodes: |"] + [f"    {f}" for f in folders]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_imports() -> None:
    """Make ComfyUI importable as a library and choose CPU or GPU before ``comfy.model_management`` loads."""
    comfy = comfy_path()
    if str(comfy) not in sys.path:
        sys.path.insert(0, str(comfy))
    import comfy.cli_args

    for flag in comfy_flags():
        setattr(comfy.cli_args.args, flag.removeprefix("--"), True)
    if use_gpu():
        # In-process models load in float32 unless a test names a dtype, and float32 matmuls and convolutions stay
        # exact (no TF32), so the equivalence tests keep their fp32 tolerance on the GPU. The server keeps ComfyUI's
        # own dtype choices.
        import torch

        comfy.cli_args.args.fp32_unet = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def boot_in_process(extra_paths_yaml: Path):
    """Import ComfyUI as a library, load its built-in and custom nodes (this pack included), return ``nodes``."""
    prepare_imports()
    import folder_paths
    import utils.extra_config

    utils.extra_config.load_extra_path_config(str(extra_paths_yaml))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    missing = PACK_NODE_IDS - set(nodes.NODE_CLASS_MAPPINGS)
    if missing:
        raise RuntimeError(f"the pack's nodes did not load into ComfyUI: {sorted(missing)}")
    return nodes, folder_paths


def pack(submodule: str):
    """A module of the pack as ComfyUI loaded it (``pack("nodes.memory_patch")``), so tests and nodes share
    one copy of every class. ComfyUI names a custom-node package after its folder path."""
    import importlib

    return importlib.import_module(f"{_pack_package()}.{submodule}")


_PACKAGE: list[str] = []  # the loaded pack's package name, once found


def _pack_package() -> str:
    if _PACKAGE and _PACKAGE[0] in sys.modules:
        return _PACKAGE[0]
    init = (ROOT / "__init__.py").resolve()
    for name, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if f and f.endswith("__init__.py") and Path(f).resolve() == init:
            _PACKAGE[:] = [name]
            return name
    raise RuntimeError("the pack is not loaded into ComfyUI")


def run_node(cls, **inputs) -> tuple:
    """Execute a node class the way ComfyUI does (V3 ``execute`` or V1 ``FUNCTION``); returns its outputs."""
    if hasattr(cls, "GET_SCHEMA") and hasattr(cls, "define_schema"):
        return tuple(cls.execute(**inputs).args)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI HTTP server (main.py) on 127.0.0.1, always stopped by ``stop``. Its output, input, temp
    and user folders and its log are under ``workdir``; ``flags`` default to ``comfy_flags()``."""

    def __init__(self, workdir: Path, extra_paths_yaml: Path | None = None, flags: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "comfyui-server.log"
        self.output_dir = workdir / "output"
        self.input_dir = _mkdir(workdir / "input")
        args = [sys.executable, str(comfy_path() / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
                "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir), "--temp-directory", str(workdir / "temp"),
                "--user-directory", str(_mkdir(workdir / "user")), "--database-url", "sqlite:///:memory:",
                "--disable-auto-launch", "--log-stdout"]
        if extra_paths_yaml is not None:
            args += ["--extra-model-paths-config", str(extra_paths_yaml)]
        args += comfy_flags() if flags is None else flags
        if importlib.util.find_spec("comfyui_frontend_package") is None:  # e.g. a GPU machine set up offline
            args += ["--front-end-root", str(_mkdir(workdir / "frontend"))]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(comfy_path()))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format graph and wait for its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "memlearner-host"})
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(body)[:3000]}")
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") == "error" or not entry["status"]["completed"]:
                    raise AssertionError(f"graph failed: {json.dumps(entry['status'])[:4000]}")
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"graph {pid} did not finish in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
