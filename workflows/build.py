"""Source of the shipped API-format workflows: ``python workflows/build.py`` rewrites ``workflows/api/*.json``.

File names are those of ComfyUI's repackaged Wan2.1 release; ``tiny=True`` swaps in the test fixtures (and
seeded random text conditioning, since the umt5 text encoder has no tiny stand-in).
"""

from __future__ import annotations

import json
from pathlib import Path

REAL = {
    "unet": "wan2.1_t2v_1.3B_fp16.safetensors",
    "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "encoder": "dit_mem_1.3b.safetensors",
    "width": 832, "height": 480, "length": 33, "steps": 30, "cfg": 5.0,
}
TINY = {
    "unet": "tiny_wan21_t2v.safetensors", "vae": "tiny_wan21_vae.safetensors",
    "encoder": "tiny_dit_mem.safetensors", "width": 64, "height": 64, "length": 9, "steps": 3, "cfg": 3.0,
}
PROMPT = "a slow walk through a sunlit stone courtyard, the camera turns back to the fountain"
NEGATIVE = "blurry, distorted, low quality"


def memory_demo(tiny: bool = False, seed: int = 42) -> dict:
    """Two chunks: the first from plain Wan2.1; the second remembers it through both memories (the first chunk
    is the query-memory context and the DiT-Mem reference video). Saves both chunks' frames."""
    f = TINY if tiny else REAL
    g: dict[str, dict] = {}
    g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": f["unet"], "weight_dtype": "default"}}
    if tiny:
        g["pos"] = {"class_type": "MemLearnerTestRandomConditioning", "inputs": {"seed": 1}}
        g["neg"] = {"class_type": "MemLearnerTestRandomConditioning", "inputs": {"seed": 2}}
    else:
        g["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": f["clip"], "type": "wan", "device": "default"}}
        g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}}
        g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["clip", 0]}}
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": f["vae"]}}
    g["empty"] = {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": f["width"], "height": f["height"], "length": f["length"], "batch_size": 1}}
    sampler = {"steps": f["steps"], "cfg": f["cfg"], "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
               "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0]}
    g["chunk1"] = {"class_type": "KSampler", "inputs": {**sampler, "model": ["unet", 0], "seed": seed}}
    g["encoder"] = {"class_type": "MemLearnerLoadMemoryEncoder", "inputs": {"encoder_name": f["encoder"], "dtype": "default"}}
    g["memory"] = {"class_type": "MemLearnerEncodeReferenceVideo",
                   "inputs": {"memory_encoder": ["encoder", 0], "latent": ["chunk1", 0], "frames_per_video": 0,
                              "strength": 1.0, "deduplicate": True}}
    g["apply"] = {"class_type": "MemLearnerApplyQueryMemory",
                  "inputs": {"model": ["unet", 0], "context": ["chunk1", 0], "query_layers": 2 if tiny else 5,
                             "memory": ["memory", 0], "cache_context": True}}
    g["chunk2"] = {"class_type": "KSampler", "inputs": {**sampler, "model": ["apply", 0], "seed": seed + 1}}
    for i, chunk in enumerate(("chunk1", "chunk2"), 1):
        g[f"decode{i}"] = {"class_type": "VAEDecode", "inputs": {"samples": [chunk, 0], "vae": ["vae", 0]}}
        g[f"save{i}"] = {"class_type": "SaveImage",
                         "inputs": {"images": [f"decode{i}", 0], "filename_prefix": f"memlearner/chunk{i}"}}
    return g


WORKFLOWS = {"memory_demo": memory_demo}


def main() -> None:
    out = Path(__file__).resolve().parent / "api"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (out / f"{name}.json").write_text(json.dumps(build(), indent=2) + "\n")
        print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
