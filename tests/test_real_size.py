"""The real-size Wan2.1 T2V-1.3B architecture (random weights, nothing downloaded) through the shipped rollout
workflow on a GPU: 480x832, 81 frames per chunk, 3 chunks.

GPU runs only (``MEMLEARNER_TEST_GPU=1``): on CPU one step of the 1.3B model over 32,760 tokens takes minutes.
The text encoder is the one substitution: ComfyUI builds umt5-xxl at 5.7B parameters, so the prompt is seeded
random text of umt5's shape (as in every other test).
"""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from test_benchmarks import load_benchmark

import host

sys.path.insert(0, str(host.ROOT / "workflows"))
import build  # noqa: E402

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(not host.use_gpu(), reason="needs a CUDA GPU: run with MEMLEARNER_TEST_GPU=1")]

WAN_VAE = dict(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)  # the released Wan2.1 VAE
STEPS = 4  # per chunk: enough to run every part of the graph; the cost per step is the benchmark's business


@pytest.fixture(scope="module")
def real_size_models(models_dir):
    """The 1.3B DiT and the Wan2.1 VAE at full size, random bf16 weights, under the workflow's file names."""
    import comfy.ldm.wan.vae

    bench = load_benchmark()
    with torch.device("meta"):
        vae = comfy.ldm.wan.vae.WanVAE(**WAN_VAE)
    files = {build.REAL["unet"]: ("diffusion_models", bench.random_wan_state_dict("1.3b", "cuda", torch.bfloat16)),
             build.REAL["vae"]: ("vae", bench.random_state_dict(vae, "cuda", torch.bfloat16))}
    for name, (folder, sd) in files.items():
        save_file({k: v.cpu() for k, v in sd.items()}, str(models_dir / folder / name))
    del files
    torch.cuda.empty_cache()


def test_shipped_rollout_workflow_runs_at_real_size(server, real_size_models):
    graph = build.memory_rollout(tiny=False)
    del graph["clip"]
    graph["pos"] = build.node("MemLearnerTestRandomConditioning", "Prompt", variant=1)
    graph["neg"] = build.node("MemLearnerTestRandomConditioning", "Negative prompt", variant=2)
    graph["chunk"]["inputs"].update(width=832, height=480, length=81)
    graph["sigmas"]["inputs"]["steps"] = STEPS
    graph["rollout"]["inputs"].update(chunks=3, context_frames=81)
    graph["report"] = build.node("PreviewAny", source=["rollout", 1])
    entry = server.run_prompt(graph, timeout=540)
    assert entry["outputs"]["save_rollout"]["images"], "the rollout saved no video"
    report = json.loads(entry["outputs"]["report"]["text"][0])
    assert len(report) == 3
    total = torch.cuda.get_device_properties(0).total_memory / 2**20
    for chunk in report:
        assert 0 < chunk["peak_memory_mb"] < total
    print("real-size rollout per chunk:", json.dumps(report))
