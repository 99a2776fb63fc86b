"""The ground: the pack inside a real ComfyUI server, on the tiny Wan2.1 fixtures."""

import math

import pytest

import host
import tiny_models

pytestmark = pytest.mark.server


def t2v_graph(seed=0, steps=2, frames=5, size=64):
    """UNETLoader -> KSampler -> VAEDecode, text from the test-only random conditioning node."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_models.WAN_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "MemLearnerTestRandomConditioning", "inputs": {"variant": 1}},
        "3": {"class_type": "MemLearnerTestRandomConditioning", "inputs": {"variant": 2}},
        "4": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": size, "height": size, "length": frames, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_models.VAE_FILE}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "t2v"}},
    }


def test_server_lists_the_pack_nodes(server):
    info = server.get("/object_info")
    assert host.PACK_NODE_IDS <= set(info)
    assert info["MemLearnerApplyQueryMemory"]["display_name"] == "Apply Query Memory"


def test_server_log_has_no_import_failure(server):
    server.get("/object_info")
    log = server.log()
    pack_lines = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and "memlearner" in ln.lower()]
    assert not pack_lines, "\n".join(pack_lines)
    assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if "custom_nodes" in ln or "memlearner" in ln)


def test_text_to_video_graph_runs_through_the_http_api(server):
    entry = server.run_prompt(t2v_graph())
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 5  # 5 frames decoded
    import numpy as np
    from PIL import Image

    frame = np.asarray(Image.open(server.output_dir / images[0]["subfolder"] / images[0]["filename"]))
    assert frame.shape == (64, 64, 3)
    assert np.isfinite(frame.astype(float)).all() and math.isfinite(float(frame.std()))
