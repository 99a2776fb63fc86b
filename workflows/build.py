"""Source of the shipped workflows: ``python workflows/build.py`` rewrites ``workflows/api/*.json`` (API format,
for headless use) and ``example_workflows/*.json`` (UI format: ComfyUI's template browser lists a pack's
``example_workflows/``; or drag them into ComfyUI), both from the graphs below, for the node definitions of the ComfyUI it runs on (the oldest supported host, 0.3.75,
whose UI files newer frontends load and upgrade; recorded in ``workflows/definitions/node_definitions.json``).

File names are those of ComfyUI's repackaged Wan2.1 release (Wan2.2 for the A14B experts and TI2V-5B);
``tiny=True`` swaps in the test fixtures (and seeded random text conditioning, since ComfyUI's loader builds the
umt5 text encoder at full size; for TI2V-5B the tiny Wan2.2 VAE node in place of Load VAE, which builds that VAE at
full width). Nodes carry
titles (``_meta.title``) that the headless client uses as input names (``Prompt``, ``Reference video``...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOLDERS = {"api": HERE / "api", "ui": HERE.parent / "example_workflows"}
# the node definitions the UI files are written for (see definitions); not at the top of workflows/, where
# ComfyUI 0.3x looks for templates too
DEFINITIONS = HERE / "definitions" / "node_definitions.json"
REAL = {
    "unet": "wan2.1_t2v_1.3B_fp16.safetensors",
    "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "encoder": "dit_mem_1.3b.safetensors",
    "reference": "reference.mp4",
    "width": 832, "height": 480, "length": 33, "steps": 30, "cfg": 5.0, "query_layers": 5,
    "chunk_frames": 33, "chunks": 6, "context_frames": 27,
}
TINY = {
    "unet": "tiny_wan21_t2v.safetensors", "vae": "tiny_wan21_vae.safetensors",
    "encoder": "tiny_dit_mem.safetensors", "reference": "memlearner_reference.mp4",
    "width": 64, "height": 64, "length": 9, "steps": 3, "cfg": 3.0, "query_layers": 2,
    "chunk_frames": 5, "chunks": 3, "context_frames": 3,
}
# Wan2.2 T2V-A14B, as ComfyUI's template (video_wan2_2_14B_t2v) samples it: shift 8, euler, 20 steps at cfg 3.5, the
# low-noise expert from step 10 on
REAL_A14B = {**REAL, "unet": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
             "unet_low": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "steps": 20, "cfg": 3.5, "shift": 8.0,
             "switch_step": 10}
TINY_A14B = {**TINY, "unet_low": "tiny_wan21_t2v_low_noise.safetensors", "shift": 8.0, "switch_step": 2}
# Wan2.2 TI2V-5B, as ComfyUI's template (video_wan2_2_5B_ti2v) samples it: shift 8, uni_pc, 20 steps at cfg 5,
# 1280x704 at 24 fps, its chunk latent from Wan22ImageToVideoLatent (48 channels, 16x spatial)
REAL_5B = {**REAL, "unet": "wan2.2_ti2v_5B_fp16.safetensors", "vae": "wan2.2_vae.safetensors", "width": 1280,
           "height": 704, "steps": 20, "cfg": 5.0, "shift": 8.0, "fps": 24.0}
# ComfyUI's Load VAE builds the Wan2.2 VAE at full width: the tiny one comes from a fixture node instead
TINY_5B = {**TINY, "unet": "tiny_wan22_ti2v_5b.safetensors", "vae": None, "shift": 8.0, "fps": 24.0}
TOY = {  # the toy model trained on the revisit world (benchmarks/revisit_world.py), shipped with the pack
    "unet": "revisit_query.safetensors", "query_weights": "revisit_query_query.safetensors", "query_layers": 2,
    "steps": 10, "budget": 4,
}
DOOM_CLIP = HERE.parent / "memlearner_host" / "doom_model" / "clip"  # the held-out clip the workflow re-renders
DOOM = {  # the small model and VAE trained on the Doom world (benchmarks/doom_world.py), shipped with the pack
    "unet": "doom_memory.safetensors", "query_weights": "doom_memory_query.safetensors",
    "plain": "doom_memory.safetensors", "vae": "doom_wan21_vae.safetensors",
    "video": "memlearner_doom_MAP21_turn.mp4", "width": 128, "height": 96, "history": 29, "frames": 61, "steps": 10,
    "query_layers": 2, "budget": 4, "fps": 16.0,
}
DOOM_NOTE = """A small model and VAE trained with memlearner-train on ViZDoom renders of Freedoom 2 MAP01-20, shipped
with the pack (benchmarks/doom_world.py):
- memlearner_host/doom_model/diffusion_models/doom_memory.safetensors -> models/diffusion_models/
- memlearner_host/doom_model/memlearner/doom_memory_query.safetensors -> models/memlearner/
- memlearner_host/doom_model/vae/doom_wan21_vae.safetensors -> models/vae/
- memlearner_host/doom_model/clip/memlearner_doom_MAP21_turn.mp4 -> input/ (a held-out map)
Video Score (all) should beat Video Score (no_memory): the way back revisits what the way out showed."""
PROMPT = "a slow walk through a sunlit stone courtyard, the camera turns back to the fountain"
NEGATIVE = "blurry, distorted, low quality"
FPS = 16.0

MODEL_NOTE = """Model files (ComfyUI's repackaged Wan2.1 release):
- models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors
- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
- models/vae/wan_2.1_vae.safetensors"""
ENCODER_NOTE = """DiT-Mem encoder: the safetensors file of Thrcle/DiT-Mem-1.3B
-> models/memory_encoders/dit_mem_1.3b.safetensors
(or type Thrcle/DiT-Mem-1.3B into hf_repo to download it once)."""
QUERY_NOTE = """Meaningful only with a query-memory fine-tune: the Wan2.1 weights memlearner-train query writes
(models/diffusion_models/, in Load Diffusion Model) and its query-weights file (models/memlearner/, in query_weights).
On the stock Wan2.1 the query layers run untrained: the graph runs, but what it makes shows no memory."""

A14B_NOTE = """Model files (ComfyUI's repackaged Wan2.2 release, as its Wan2.2 14B T2V template):
- models/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors (Load Diffusion Model, high noise)
- models/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors (Load Diffusion Model, low noise)
- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
- models/vae/wan_2.1_vae.safetensors"""
A14B_QUERY_NOTE = """Each chunk: the high-noise expert samples steps 0-9 of 20, the low-noise expert steps 10-19
(switch_step), both reading the same memory. Meaningful only with a query-memory fine-tune of each expert (each
in its Load Diffusion Model; its query-weights file in query_weights, the low-noise one's in query_weights_low,
which defaults to the same file). On the stock experts the query layers run untrained: the graph runs, but what it
makes shows no memory."""

TI2V_5B_NOTE = """Model files (ComfyUI's repackaged Wan2.2 release, as its Wan2.2 5B TI2V template):
- models/diffusion_models/wan2.2_ti2v_5B_fp16.safetensors
- models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors
- models/vae/wan2.2_vae.safetensors (48 latent channels, 16x spatial: Chunk size takes it)"""
TI2V_5B_QUERY_NOTE = """Meaningful only with a query-memory fine-tune of Wan2.2 TI2V-5B: the 5B weights memlearner-train
query writes (models/diffusion_models/, in Load Diffusion Model) and its query-weights file (models/memlearner/,
in query_weights); query weights fine-tuned on another model family are refused. On the stock TI2V-5B the query
layers run untrained: the graph runs, but what it makes shows no memory.
Policies: all, recent, fov (needs a camera), framepack."""

TOY_NOTE = """A toy model trained with memlearner-train on the revisit world (CPU, minutes), shipped with the pack:
- memlearner_host/revisit_model/diffusion_models/revisit_query.safetensors -> models/diffusion_models/
- memlearner_host/revisit_model/memlearner/revisit_query_query.safetensors -> models/memlearner/
Revisit Score (all) should show a far higher revisit_psnr than Revisit Score (recent)."""


def node(class_type: str, title: str | None = None, **inputs) -> dict:
    n = {"class_type": class_type, "inputs": inputs}
    if title:
        n["_meta"] = {"title": title}
    return n


def base(f: dict, tiny: bool) -> dict[str, dict]:
    """Wan2.1 model, prompt conditioning and VAE."""
    g = {"unet": node("UNETLoader", unet_name=f["unet"], weight_dtype="default")}
    if tiny:
        g["pos"] = node("MemLearnerTestRandomConditioning", "Prompt", variant=1)
        g["neg"] = node("MemLearnerTestRandomConditioning", "Negative prompt", variant=2)
    else:
        g["clip"] = node("CLIPLoader", clip_name=f["clip"], type="wan", device="default")
        g["pos"] = node("CLIPTextEncode", "Prompt", text=PROMPT, clip=["clip", 0])
        g["neg"] = node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=["clip", 0])
    if f["vae"] is None:  # the tiny Wan2.2 VAE (memlearner_host/comfy_nodes)
        g["vae"] = node("MemLearnerTestTinyWan22VAE", seed=3)
    else:
        g["vae"] = node("VAELoader", vae_name=f["vae"])
    return g


def sampler(g: dict, f: dict, name: str, model: str, seed: int, latent: str = "empty", title: str | None = None):
    if "empty" not in g:
        g["empty"] = node("EmptyHunyuanLatentVideo", "Video size", width=f["width"], height=f["height"], length=f["length"],
                          batch_size=1)
    g[name] = node("KSampler", title, model=[model, 0], seed=seed, steps=f["steps"], cfg=f["cfg"],
                   sampler_name="uni_pc", scheduler="simple", positive=["pos", 0], negative=["neg", 0],
                   latent_image=[latent, 0], denoise=1.0)


def save_video(g: dict, latent: str, name: str, fps: float = FPS) -> None:
    """Decode, make a video at ``fps`` (16: Wan2.1's), save it under output/memlearner/."""
    g[f"decode_{name}"] = node("VAEDecode", samples=[latent, 0], vae=["vae", 0])
    g[f"video_{name}"] = node("CreateVideo", images=[f"decode_{name}", 0], fps=fps)
    g[f"save_{name}"] = node("SaveVideo", f"Save {name}", video=[f"video_{name}", 0], filename_prefix=f"memlearner/{name}",
                             format="auto", codec="auto")


def encoder(g: dict, f: dict) -> None:
    g["encoder"] = node("MemLearnerLoadMemoryEncoder", encoder_name=f["encoder"], dtype="default", hf_repo="")


def dit_mem_reference(tiny: bool = False, seed: int = 42) -> dict:
    """DiT-Mem: a reference video from ComfyUI's input folder becomes memory for a stock Wan2.1 T2V 1.3B."""
    f = TINY if tiny else REAL
    g = base(f, tiny)
    encoder(g, f)
    g["reference"] = node("LoadVideo", "Reference video", file=f["reference"])
    g["frames"] = node("GetVideoComponents", video=["reference", 0])
    g["memory"] = node("MemLearnerEncodeReferenceVideo", memory_encoder=["encoder", 0], images=["frames", 0],
                       vae=["vae", 0], frames_per_video=0, strength=1.0, deduplicate=True)
    g["apply"] = node("MemLearnerApplyReferenceMemory", model=["unet", 0], memory=["memory", 0])
    sampler(g, f, "sample", "apply", seed, title="Sampler")
    save_video(g, "sample", "dit_mem")
    return g


def two_chunks(tiny: bool, seed: int, reference: bool) -> dict:
    """A first chunk from plain Wan2.1, then a chunk that reads it as query-memory history (and, with
    ``reference``, as its DiT-Mem reference video too)."""
    f = TINY if tiny else REAL
    g = base(f, tiny)
    sampler(g, f, "chunk1", "unet", seed, title="First chunk")
    memory = {}
    if reference:
        encoder(g, f)
        g["memory"] = node("MemLearnerEncodeReferenceVideo", memory_encoder=["encoder", 0], latent=["chunk1", 0],
                           frames_per_video=0, strength=1.0, deduplicate=True)
        memory = {"memory": ["memory", 0]}
    g["apply"] = node("MemLearnerApplyQueryMemory", model=["unet", 0], context=["chunk1", 0],
                      query_layers=f["query_layers"], **memory, query_weights="none", camera_poses="",
                      cache_context=True, query_pool=1)
    sampler(g, f, "chunk2", "apply", seed + 1, title="Next chunk")
    save_video(g, "chunk1", "chunk1")
    save_video(g, "chunk2", "chunk2")
    return g


def query_memory(tiny: bool = False, seed: int = 42) -> dict:
    """Query memory: a first chunk from plain Wan2.1, then a second chunk that reads it as history."""
    return two_chunks(tiny, seed, reference=False)


def sampling_parts(g: dict, model: str, steps: int, cfg: float | None, sampler_name: str, seed: int,
                   positive: list | None = None, negative: list | None = None) -> None:
    """ComfyUI's own sampling parts, as Sampler Custom Advanced takes them: noise, guider (CFG, or basic for
    ``cfg=None``), sampler and sigmas."""
    positive = positive or ["pos", 0]
    g["noise"] = node("RandomNoise", "Noise", noise_seed=seed)
    if cfg is None:
        g["guider"] = node("BasicGuider", "Guider", model=[model, 0], conditioning=positive)
    else:
        g["guider"] = node("CFGGuider", "Guider", model=[model, 0], positive=positive, negative=negative or ["neg", 0],
                           cfg=cfg)
    g["sampler"] = node("KSamplerSelect", "Sampler", sampler_name=sampler_name)
    g["sigmas"] = node("BasicScheduler", "Scheduler", model=[model, 0], scheduler="simple", steps=steps, denoise=1.0)


def rollout_node(title: str, chunks, policy: str, context_frames: int, query_layers: int, query_weights: str,
                 **optional) -> dict:
    """Memory Rollout over the shared sampling parts, one chunk the size of ``chunk``."""
    return node("MemLearnerRollout", title, noise=["noise", 0], guider=["guider", 0], sampler=["sampler", 0],
                sigmas=["sigmas", 0], chunk_latent=["chunk", 0], chunks=chunks, policy=policy,
                context_frames=context_frames, query_layers=query_layers, query_weights=query_weights, query_pool=1,
                **optional)


def memory_rollout(tiny: bool = False, seed: int = 42) -> dict:
    """A long video along a walk-and-revisit camera path; each chunk's context picked by camera overlap."""
    f = TINY if tiny else REAL
    g = base(f, tiny)
    sampling_parts(g, "unet", f["steps"], f["cfg"], "uni_pc", seed)
    g["chunk"] = node("EmptyHunyuanLatentVideo", "Chunk size", width=f["width"], height=f["height"],
                      length=f["chunk_frames"], batch_size=1)
    g["camera"] = node("MemLearnerCameraPath", "Camera path", camera="walk_and_revisit",
                       trajectory='{"distance": 4.0}')
    g["rollout"] = rollout_node("Memory Rollout", f["chunks"], "fov", f["context_frames"], f["query_layers"], "none",
                                camera_path=["camera", 0])
    save_video(g, "rollout", "rollout")
    return g


def wan22_a14b_rollout(tiny: bool = False, seed: int = 42) -> dict:
    """Memory Rollout on Wan2.2 T2V-A14B's two experts: the high-noise expert samples each chunk's first steps, the
    low-noise expert the rest (switch_step), both with the same memory of the chunks before."""
    f = TINY_A14B if tiny else REAL_A14B
    g = base(f, tiny)
    g["unet_low"] = node("UNETLoader", "Low-noise expert", unet_name=f["unet_low"], weight_dtype="default")
    g["shift"] = node("ModelSamplingSD3", "Shift (high noise)", model=["unet", 0], shift=f["shift"])
    g["shift_low"] = node("ModelSamplingSD3", "Shift (low noise)", model=["unet_low", 0], shift=f["shift"])
    sampling_parts(g, "shift", f["steps"], f["cfg"], "euler", seed)
    g["guider_low"] = node("CFGGuider", "Guider (low noise)", model=["shift_low", 0], positive=["pos", 0],
                           negative=["neg", 0], cfg=f["cfg"])
    g["chunk"] = node("EmptyHunyuanLatentVideo", "Chunk size", width=f["width"], height=f["height"],
                      length=f["chunk_frames"], batch_size=1)
    g["camera"] = node("MemLearnerCameraPath", "Camera path", camera="walk_and_revisit",
                       trajectory='{"distance": 4.0}')
    g["rollout"] = rollout_node("Memory Rollout", f["chunks"], "fov", f["context_frames"], f["query_layers"], "none",
                                camera_path=["camera", 0], guider_low=["guider_low", 0],
                                switch_step=f["switch_step"], query_weights_low="same as query_weights")
    save_video(g, "rollout", "a14b_rollout")
    return g


def wan22_5b_query_memory(tiny: bool = False, seed: int = 42) -> dict:
    """Memory Rollout on Wan2.2 TI2V-5B: the memory_rollout graph on the 5B model (shift 8) and its Wan2.2 VAE, each
    chunk's latent from Wan22ImageToVideoLatent (48 channels) as ComfyUI's template makes it."""
    f = TINY_5B if tiny else REAL_5B
    g = base(f, tiny)
    g["shift"] = node("ModelSamplingSD3", "Shift", model=["unet", 0], shift=f["shift"])
    sampling_parts(g, "shift", f["steps"], f["cfg"], "uni_pc", seed)
    g["chunk"] = node("Wan22ImageToVideoLatent", "Chunk size", vae=["vae", 0], width=f["width"], height=f["height"],
                      length=f["chunk_frames"], batch_size=1)
    g["camera"] = node("MemLearnerCameraPath", "Camera path", camera="walk_and_revisit",
                       trajectory='{"distance": 4.0}')
    g["rollout"] = rollout_node("Memory Rollout", f["chunks"], "fov", f["context_frames"], f["query_layers"], "none",
                                camera_path=["camera", 0])
    save_video(g, "rollout", "wan22_5b_rollout", fps=f["fps"])
    return g


def both_memories(tiny: bool = False, seed: int = 42) -> dict:
    """Both memories: the first chunk is the query-memory history and the DiT-Mem reference video of the next."""
    return two_chunks(tiny, seed, reference=True)


def revisit_world(tiny: bool = False, seed: int = 10_000_000) -> dict:
    """Memory that remembers, on any machine: the toy model trained on the revisit world rolls out a held-out world
    from its ground-truth first frames, once reading all history (policy all) and once a sliding window (recent);
    Revisit Score measures both against the truth and saves ground truth | generated side by side."""
    f = TOY
    g = {"unet": node("UNETLoader", unet_name=f["unet"], weight_dtype="default"),
         "world": node("MemLearnerRevisitWorld", "Revisit World", seed=seed, path="pan_and_return")}
    sampling_parts(g, "unet", f["steps"], None, "euler", 0, positive=["world", 4])
    g["chunk"] = node("EmptyHunyuanLatentVideo", "Chunk size", width=64, height=64, length=5, batch_size=1)
    g["camera"] = node("MemLearnerCameraPath", "Camera path", camera="custom JSON", trajectory=["world", 2])
    for policy, budget in (("all", 0), ("recent", f["budget"])):
        g[f"rollout_{policy}"] = rollout_node(f"Memory Rollout ({policy})", ["world", 3], policy, budget,
                                              f["query_layers"], f["query_weights"], camera_path=["camera", 0],
                                              first_chunk=["world", 1])
        g[f"score_{policy}"] = node("MemLearnerRevisitScore", f"Revisit Score ({policy})", world=["world", 0],
                                    latent=[f"rollout_{policy}", 0])
        g[f"video_{policy}"] = node("CreateVideo", images=[f"score_{policy}", 1], fps=4.0)
        g[f"save_{policy}"] = node("SaveVideo", f"Save {policy}", video=[f"video_{policy}", 0],
                                   filename_prefix=f"memlearner/revisit_{policy}", format="auto", codec="auto")
    return g


def doom_return(rollouts: dict | None = None, f: dict = DOOM, trajectory: str = "", save=("video",),
                oracle: bool = False, seed: int = 0) -> dict:
    """A held-out Doom return re-rendered: Load Video, its way out (``history`` frames at the model's size) VAE-encoded
    as Memory Rollout's first chunk, the rest generated along the clip's recorded camera path (Camera Path, custom
    JSON), decoded and scored against the video (Video Score). ``rollouts``: name -> {model, policy, context_frames,
    query_layers, query_weights} (default: memory on, all history, and the same model with memory off). ``save``:
    any of "video" (reference | generated, an mp4 each) and "webp" (the decoded frames and the reference, lossless,
    for measuring: ``save_<name>_frames``, ``save_reference_frames``); ``oracle``: the video's own VAE round trip
    beside them."""
    rollouts = rollouts or {
        "all": {"model": f["unet"], "policy": "all", "context_frames": 0, "query_layers": f["query_layers"],
                "query_weights": f["query_weights"]},
        "no_memory": {"model": f["plain"], "policy": "all", "context_frames": 0, "query_layers": 0,
                      "query_weights": "none"}}
    chunk = 5  # video frames a chunk: 2 latent frames
    chunks = (f["frames"] - f["history"]) // 4 // 2
    g = {"vae": node("VAELoader", vae_name=f["vae"]), "text": node("MemLearnerEmptyText", "No prompt"),
         "video": node("LoadVideo", "Held-out video", file=f["video"]),
         "frames": node("GetVideoComponents", video=["video", 0]),
         "scaled": node("ImageScale", "Model size", image=["frames", 0], upscale_method="area", width=f["width"],
                        height=f["height"], crop="disabled"),
         "given": node("ImageFromBatch", "The way out (given)", image=["scaled", 0], batch_index=0,
                       length=f["history"]),
         "history": node("VAEEncode", pixels=["given", 0], vae=["vae", 0]),
         "chunk": node("EmptyHunyuanLatentVideo", "Chunk size", width=f["width"], height=f["height"], length=chunk,
                       batch_size=1),
         "camera": node("MemLearnerCameraPath", "Camera path (recorded)", camera="custom JSON", trajectory=trajectory),
         "noise": node("RandomNoise", "Noise", noise_seed=seed),
         "sampler": node("KSamplerSelect", "Sampler", sampler_name="euler")}
    models = {}
    for r in rollouts.values():
        if r["model"] not in models:
            m = models[r["model"]] = f"unet{len(models)}"
            g[m] = node("UNETLoader", unet_name=r["model"], weight_dtype="default")
            g[f"guider_{m}"] = node("BasicGuider", model=[m, 0], conditioning=["text", 0])
            g[f"sigmas_{m}"] = node("BasicScheduler", model=[m, 0], scheduler="simple", steps=f["steps"], denoise=1.0)
    outputs = {name: f"rollout_{name}" for name in rollouts}
    for name, r in rollouts.items():
        m = models[r["model"]]
        g[f"rollout_{name}"] = node("MemLearnerRollout", f"Memory Rollout ({name})", noise=["noise", 0],
                                    guider=[f"guider_{m}", 0], sampler=["sampler", 0], sigmas=[f"sigmas_{m}", 0],
                                    chunk_latent=["chunk", 0], chunks=chunks, policy=r["policy"],
                                    context_frames=r["context_frames"], query_layers=r["query_layers"],
                                    query_weights=r["query_weights"], query_pool=1, camera_path=["camera", 0],
                                    first_chunk=["history", 0])
    if oracle:
        g["encoded_all"] = node("VAEEncode", pixels=["scaled", 0], vae=["vae", 0])
        outputs["oracle"] = "encoded_all"
    for name, latent in outputs.items():
        g[f"decode_{name}"] = node("VAEDecode", samples=[latent, 0], vae=["vae", 0])
        g[f"score_{name}"] = node("MemLearnerVideoScore", f"Video Score ({name})", images=[f"decode_{name}", 0],
                                  reference=["scaled", 0], from_frame=f["history"], label=name,
                                  **({"rollout_report": [latent, 1]} if latent.startswith("rollout_") else {}))
        if "webp" in save:
            g[f"save_{name}_frames"] = frames_webp(f"decode_{name}", name, f["fps"])
        if "video" in save:
            g[f"video_{name}"] = node("CreateVideo", images=[f"score_{name}", 1], fps=f["fps"])
            g[f"save_{name}"] = node("SaveVideo", f"Save {name}", video=[f"video_{name}", 0],
                                     filename_prefix=f"memlearner/doom_{name}", format="auto", codec="auto")
    if "webp" in save:
        g["save_reference_frames"] = frames_webp("scaled", "reference", f["fps"])
    return g


def doom_trajectory(poses_file: Path | None = None) -> str:
    """A clip's recorded camera path (``<clip>.poses.json``, one pose per video frame; default the shipped held-out
    clip's, ``memlearner_host/doom_model/clip/``) at one pose per latent frame (video frames 0, 4, ...): Camera
    Path's custom JSON."""
    poses = json.loads((poses_file or (DOOM_CLIP / DOOM["video"]).with_suffix(".poses.json")).read_text())
    return "[\n" + ",\n".join(json.dumps(p) for p in poses[::4]) + "\n]"


def doom_return_workflow(tiny: bool = False, seed: int = 0, save=("video",)) -> dict:
    """The shipped Doom return (the small model shipped with the pack, whichever weights are present: ``tiny``
    changes nothing)."""
    return doom_return(trajectory=doom_trajectory(), save=save, seed=seed)


def frames_webp(images: str, name: str, fps: float) -> dict:
    """Frames saved exactly (lossless animated WEBP), to be measured."""
    return node("SaveAnimatedWEBP", images=[images, 0], filename_prefix=f"memlearner/doom/{name}", fps=fps,
                lossless=True, quality=100, method="fastest")


WORKFLOWS = {"dit_mem_reference": dit_mem_reference, "query_memory": query_memory,
             "memory_rollout": memory_rollout, "both_memories": both_memories, "revisit_world": revisit_world,
             "wan22_a14b_rollout": wan22_a14b_rollout, "wan22_5b_query_memory": wan22_5b_query_memory,
             "doom_return": doom_return_workflow}
NOTES = {"dit_mem_reference": [MODEL_NOTE, ENCODER_NOTE + "\nPut the reference video in input/ (reference.mp4)."],
         "query_memory": [MODEL_NOTE, QUERY_NOTE],
         "memory_rollout": [MODEL_NOTE, QUERY_NOTE + "\nPolicies: all, recent, fov (needs a camera), framepack."],
         "both_memories": [MODEL_NOTE, ENCODER_NOTE, QUERY_NOTE],
         "revisit_world": [TOY_NOTE],
         "wan22_a14b_rollout": [A14B_NOTE, A14B_QUERY_NOTE],
         "wan22_5b_query_memory": [TI2V_5B_NOTE, TI2V_5B_QUERY_NOTE],
         "doom_return": [DOOM_NOTE]}


def definitions(object_info: dict, comfyui_version: str) -> dict:
    """What the UI files are written for: the node definitions (``/object_info`` entries) of every class the
    workflows use, and the ComfyUI they came from. Committed as ``workflows/definitions/node_definitions.json``, so the UI files
    are checked against them on any host, and each host's own definitions against them (``tests/test_workflows.py``)."""
    used = sorted({n["class_type"] for build in WORKFLOWS.values() for n in build().values()})
    return {"comfyui": comfyui_version, "nodes": {c: object_info[c] for c in used}}


def write_all(object_info: dict, comfyui_version: str) -> list[Path]:
    """Write the node definitions and every workflow in both formats; ``object_info`` is ComfyUI's
    ``/object_info`` (for widget order)."""
    from ui_format import to_ui

    defs = definitions(object_info, comfyui_version)
    DEFINITIONS.write_text(json.dumps(defs, indent=1, sort_keys=True) + "\n")
    written = [DEFINITIONS]
    for name, build in WORKFLOWS.items():
        graph = build()
        for folder, data in (("api", graph), ("ui", to_ui(graph, defs["nodes"], NOTES[name]))):
            path = FOLDERS[folder] / f"{name}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
            written.append(path)
    return written


def main() -> None:
    """Start ComfyUI with the pack (``memlearner_host``), read its node definitions, write the workflows."""
    sys.path.insert(0, str(HERE))
    sys.path.append(str(HERE.parent))  # appended: the pack's ``nodes`` never shadows ComfyUI's
    import tempfile

    from memlearner_host.server import ComfyServer

    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp), None)
        try:
            server.wait_ready()
            info = server.get("/object_info")
            version = server.get("/system_stats")["system"]["comfyui_version"]
        finally:
            server.stop()
    import thumbnails

    for path in write_all(info, version) + thumbnails.write_all():
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
