"""The pack under ComfyUI's model management: weight dtypes, low-VRAM weight streaming, memory accounting, leaks.

On CPU (CI) ComfyUI computes in float32 whatever dtype the weights are stored in. With ``MEMLEARNER_TEST_GPU=1``
on a CUDA machine the same tests run with ComfyUI's GPU choices (bf16/fp16 compute, fp8 weights cast per
layer, weights streamed from CPU), and ``MEMLEARNER_TEST_VRAM=lowvram|novram`` runs them under ComfyUI's
``--lowvram`` / ``--novram``.
"""

import sys

import pytest
import torch

import host
import tiny_models
from forward import model_forward, rel_err

sys.path.insert(0, str(host.ROOT / "workflows"))
import build  # noqa: E402

# Relative error (max-norm) of a 2-step patched sampling graph against its float32 run, by weight dtype. The
# memories must also add no precision loss of their own: the patched graph's error stays within twice the plain
# graph's error in the same dtype (plus a float32-noise floor). Seen on CPU (float32 compute, so weight rounding
# only): bf16 2.0e-3, fp16 3.0e-4, fp8_e4m3fn 3.0e-2.
DTYPE_TOLERANCE = {"bf16": 0.05, "fp16": 0.02, "fp8_e4m3fn": 0.15}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_wan(comfy, models_dir, weight_dtype: str):
    """The tiny Wan2.1 as the user would load it in ``weight_dtype``: fp8 through UNETLoader's ``weight_dtype``,
    float dtypes through ComfyUI's diffusion-model loader with that dtype."""
    if weight_dtype.startswith("fp8"):
        return comfy.run("UNETLoader", unet_name=tiny_models.WAN_FILE, weight_dtype=weight_dtype)[0]
    import comfy.sd

    path = models_dir / "diffusion_models" / tiny_models.WAN_FILE
    return comfy.sd.load_diffusion_model(str(path), model_options={"dtype": DTYPES[weight_dtype]})


def with_both_memories(comfy, model, encoder):
    g = torch.Generator().manual_seed(11)
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder,
                       latent={"samples": torch.randn(2, 16, 13, 16, 16, generator=g)})[0]
    model = comfy.run("MemLearnerApplyReferenceMemory", model=model, memory=memory)[0]
    context = {"samples": torch.randn(1, 16, 3, 8, 8, generator=g)}
    return comfy.run("MemLearnerApplyQueryMemory", model=model, context=context, query_layers=2)[0]


def sample(comfy, model, text_cond, seed=3):
    return comfy.run("KSampler", model=model, seed=seed, steps=2, cfg=2.0, sampler_name="euler", scheduler="simple",
                     positive=text_cond[0], negative=text_cond[1],
                     latent_image={"samples": torch.zeros(1, 16, 3, 8, 8)}, denoise=1.0)[0]["samples"]


@pytest.fixture(scope="module")
def float32_runs(comfy, models_dir, encoder, text_cond):
    """The plain and the patched graph's outputs with float32 weights."""
    wan = load_wan(comfy, models_dir, "fp32")
    return sample(comfy, wan, text_cond), sample(comfy, with_both_memories(comfy, wan, encoder), text_cond)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp16", "fp8_e4m3fn"])
def test_patched_graph_in_each_weight_dtype_stays_close_to_float32(comfy, models_dir, encoder, text_cond,
                                                                   float32_runs, weight_dtype):
    wan = load_wan(comfy, models_dir, weight_dtype)
    stored = wan.model.diffusion_model.blocks[0].self_attn.q.weight.dtype
    assert stored == {"fp8_e4m3fn": torch.float8_e4m3fn}.get(weight_dtype, DTYPES.get(weight_dtype))
    plain, patched = sample(comfy, wan, text_cond), sample(comfy, with_both_memories(comfy, wan, encoder), text_cond)
    assert torch.isfinite(patched).all()
    plain_err, patched_err = rel_err(plain, float32_runs[0]), rel_err(patched, float32_runs[1])
    assert patched_err < DTYPE_TOLERANCE[weight_dtype], (plain_err, patched_err)
    assert patched_err <= 2 * plain_err + 1e-4, (plain_err, patched_err)


def test_weights_streamed_per_layer_give_the_same_output_as_loaded_weights(comfy, models_dir, encoder):
    """Low-VRAM mode: every layer's weight is cast (and its LoRA-style patch applied) as the layer runs, through
    ComfyUI's casting ops. Patched code that read ``.weight`` directly would miss the patch or the device."""
    import comfy.model_management as mm

    wan = load_wan(comfy, models_dir, "fp32")
    g = torch.Generator().manual_seed(4)
    sd = wan.model.diffusion_model.state_dict()
    diffs = {f"diffusion_model.{k}": (0.05 * torch.randn(sd[k].shape, generator=g),)
             for k in sd if k.startswith("blocks.") and k.endswith(("self_attn.k.weight", "self_attn.v.weight"))}
    wan.add_patches(diffs, 1.0)
    model = with_both_memories(comfy, wan, encoder)
    x, t, txt = (torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([600.0]), torch.randn(1, 512, 4096, generator=g))
    try:
        mm.load_models_gpu([model], force_full_load=True)
        loaded = model_forward(model, x, t, txt, run_seed=1)
        freed = model.partially_unload(model.offload_device, memory_to_free=model.model_size())
        assert freed > 0 and model.model.model_lowvram
        streamed = model_forward(model, x, t, txt, run_seed=1)
    finally:
        mm.unload_all_models()
    assert rel_err(streamed, loaded) < 1e-5
    try:
        assert rel_err(model_forward(wan, x, t, txt), loaded) > 1e-3  # the memories matter
    finally:
        mm.unload_all_models()


def test_memory_encoder_is_loaded_and_accounted_with_the_model(comfy, wan_model, encoder, text_cond):
    import comfy.model_management as mm

    model = with_both_memories(comfy, wan_model, encoder)
    assert encoder in model.get_additional_models_with_key("memlearner")
    sample(comfy, model, text_cond)
    loaded = {id(m.model): m for m in mm.current_loaded_models}
    assert id(encoder) in loaded, "the memory encoder is not in ComfyUI's loaded models"
    assert loaded[id(encoder)].model_memory() == mm.module_size(encoder.model) > 0


@pytest.mark.server
def test_ten_rollouts_leave_memory_where_one_left_it(server):
    """Ten runs of the shipped rollout graph in one server, each with a new seed; memory measured after ``/free``."""

    def run_rollout(seed):
        graph = build.memory_rollout(tiny=True, seed=seed)
        graph["rollout"]["inputs"]["chunks"] = 2
        server.run_prompt(graph)

    def stats(tag):
        return server.run_prompt({"stats": {"class_type": "MemLearnerTestMemoryStats", "inputs": {"tag": tag}}})

    def in_use(tag):
        server.post("/free", {"unload_models": True, "free_memory": True})
        # ComfyUI's prompt worker handles /free's flags after the prompt it takes next, or at once if it was idle:
        # either way they are handled before it takes the one after that, which measures.
        stats(2 * tag)
        return stats(2 * tag + 1)["outputs"]["stats"]["memory"][0]

    run_rollout(100)
    after_one = in_use(1)
    for seed in range(101, 110):
        run_rollout(seed)
    after_ten = in_use(2)
    slack = 2**20
    assert after_ten["tensor_bytes"] <= after_one["tensor_bytes"] + slack, (after_one, after_ten)
    assert after_ten["cuda_allocated"] <= after_one["cuda_allocated"] + slack, (after_one, after_ten)
