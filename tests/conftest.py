"""Shared fixtures: the tiny models, a real ComfyUI in-process, and the real ComfyUI server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("memlearner_host") is None:  # not pip-installed: the repository root, appended so
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # the pack's ``nodes`` never shadows ComfyUI's

import host  # noqa: E402

host.prepare_imports()  # ComfyUI importable (and CPU/GPU chosen) before any test module imports comfy

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A ComfyUI models folder holding the tiny Wan2.1 DiT, VAE and memory encoder."""
    d = tmp_path_factory.mktemp("models")
    tiny_models.write_models(d)
    return d


@pytest.fixture(scope="session")
def extra_paths(models_dir, tmp_path_factory) -> Path:
    return host.write_extra_paths(models_dir, tmp_path_factory.mktemp("config") / "extra_model_paths.yaml")


@pytest.fixture(scope="session")
def comfy(extra_paths):
    """ComfyUI imported in-process with all nodes loaded: ``comfy.nodes.NODE_CLASS_MAPPINGS`` etc."""
    nodes, folder_paths = host.boot_in_process(extra_paths)

    class Host:
        pass

    h = Host()
    h.nodes, h.folder_paths = nodes, folder_paths
    h.node = lambda name: nodes.NODE_CLASS_MAPPINGS[name]
    h.run = lambda name, **kw: host.run_node(nodes.NODE_CLASS_MAPPINGS[name], **kw)
    return h


@pytest.fixture(scope="session")
def server(tmp_path_factory, extra_paths):
    """The real ComfyUI HTTP server with the pack installed; stopped at the end of the session, pass or fail."""
    srv = host.ComfyServer(tmp_path_factory.mktemp("server"), extra_paths)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def comfy_folders(tmp_path, comfy, monkeypatch) -> dict[str, Path]:
    """ComfyUI's input, user and output folders moved into ``tmp_path`` for one test, and a folder ``outside`` all
    of them: for tests of what the nodes may read and write."""
    folders = {name: tmp_path / name for name in ("input", "user", "output", "outside")}
    for path in folders.values():
        path.mkdir()
    fp = comfy.folder_paths
    monkeypatch.setattr(fp, "get_input_directory", lambda: str(folders["input"]))
    monkeypatch.setattr(fp, "get_user_directory", lambda: str(folders["user"]))
    monkeypatch.setattr(fp, "get_output_directory", lambda: str(folders["output"]))
    return folders


@pytest.fixture(scope="session")
def wan_model(comfy):
    """The tiny Wan2.1 MODEL, loaded by ComfyUI's UNETLoader."""
    return comfy.run("UNETLoader", unet_name=tiny_models.WAN_FILE, weight_dtype="default")[0]


@pytest.fixture(scope="session")
def wan22_5b(comfy):
    """The tiny Wan2.2 TI2V-5B-shaped MODEL (48 latent channels), loaded by ComfyUI's UNETLoader."""
    return comfy.run("UNETLoader", unet_name=tiny_models.WAN22_5B_FILE, weight_dtype="default")[0]


LOW_EXPERT_FILE = "tiny_wan21_t2v_low_noise.safetensors"  # workflows/build.py TINY_A14B["unet_low"]


@pytest.fixture(scope="session")
def wan_low_expert_file(models_dir) -> str:
    """A second tiny Wan2.1 DiT (other weights than ``wan_model``'s) in diffusion_models/: the low-noise expert
    of the two-expert (Wan2.2 A14B-style) tests; its file name."""
    from safetensors.torch import save_file

    path = models_dir / "diffusion_models" / LOW_EXPERT_FILE
    save_file({k: v.contiguous() for k, v in tiny_models.tiny_wan(seed=7).state_dict().items()}, str(path))
    return LOW_EXPERT_FILE


@pytest.fixture(scope="session")
def wan_low_expert(comfy, wan_low_expert_file):
    """The second tiny Wan2.1 MODEL (``wan_low_expert_file``), loaded by ComfyUI's UNETLoader."""
    return comfy.run("UNETLoader", unet_name=wan_low_expert_file, weight_dtype="default")[0]


@pytest.fixture(scope="session")
def wan_vae(comfy):
    return comfy.run("VAELoader", vae_name=tiny_models.VAE_FILE)[0]


@pytest.fixture(scope="session")
def encoder(comfy):
    """The tiny DiT-Mem encoder, loaded by Load Memory Encoder in fp32."""
    return comfy.run("MemLearnerLoadMemoryEncoder", encoder_name=tiny_models.ENCODER_FILE, dtype="fp32")[0]


@pytest.fixture(scope="session")
def wan22_vae(comfy):
    """The tiny Wan2.2 VAE (48 latent channels, 16x spatial compression), loaded by ComfyUI's VAE class."""
    return tiny_models.tiny_wan22_vae()


@pytest.fixture(scope="session")
def wan22_encoder(comfy, models_dir):
    """A tiny DiT-Mem encoder for 48-channel (Wan2.2) latents of shape 13x13x13, loaded by Load Memory Encoder."""
    from memlearner_core.checkpoint_io import save_memory_encoder

    save_memory_encoder(tiny_models.tiny_encoder(4, in_channels=48, latent_shape=(13, 13, 13)),
                        models_dir / "memory_encoders" / tiny_models.WAN22_ENCODER_FILE)
    return comfy.run("MemLearnerLoadMemoryEncoder", encoder_name=tiny_models.WAN22_ENCODER_FILE, dtype="fp32")[0]


@pytest.fixture(scope="session")
def wan22_5b_diffusers(comfy, models_dir):
    """The tiny Wan2.2 TI2V-5B as diffusers' WanTransformer3DModel (48 channels in and out): ``wan22_5b``'s file,
    converted by the pack's key conversion (``memlearner_diffusers.transformer_from_comfy``)."""
    from memlearner_diffusers import transformer_from_comfy

    return transformer_from_comfy(tiny_models.model_paths(models_dir)["wan22_5b"])


@pytest.fixture(scope="session")
def wan22_encoder_file(wan22_encoder, models_dir) -> Path:
    """The file ``wan22_encoder`` was loaded from (for hosts that read it themselves, as diffusers' does)."""
    return models_dir / "memory_encoders" / tiny_models.WAN22_ENCODER_FILE


@pytest.fixture(scope="session")
def text_cond(comfy):
    def cond(seed):
        return comfy.run("MemLearnerTestRandomConditioning", variant=seed)[0]

    return cond(1), cond(2)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A GPU run leaves its log in tests/gpu_results/ (see gpu_log.py)."""
    if host.use_gpu():
        import gpu_log

        terminalreporter.write_line(f"GPU test log: {gpu_log.write(terminalreporter, exitstatus)}")
