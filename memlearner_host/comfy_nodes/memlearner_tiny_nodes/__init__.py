"""The tiny fixtures' text conditioning and Wan2.2 VAE, as ComfyUI custom nodes (loaded from
``tiny_models.TINY_NODES``).

ComfyUI's loader builds the umt5 text encoder at its full 5.7B size, so graphs on the tiny fixtures condition on
seeded random text instead (the demo, the tests). It builds the Wan2.2 VAE at its full width too, so the tiny
Wan2.2 VAE (``tiny_models.tiny_wan22_vae``) comes from a node of its own, in place of Load VAE.
"""

import importlib.util
from pathlib import Path

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


class RandomTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerTestRandomConditioning",
            display_name="Random Text Conditioning (tiny fixtures)",
            category="memlearner/testing",
            inputs=[io.Int.Input("variant", default=0, min=0, max=2**31 - 1, tooltip="Seeds the random text.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, variant) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(variant)
        return io.NodeOutput([[torch.randn(1, 512, 4096, generator=gen), {}]])


def _tiny_models():
    """``memlearner_host/tiny_models.py``, loaded from its file (the pack's folder need not be importable here)."""
    path = Path(__file__).resolve().parents[2] / "tiny_models.py"
    spec = importlib.util.spec_from_file_location("memlearner_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyWan22VAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerTestTinyWan22VAE",
            display_name="Tiny Wan2.2 VAE (tiny fixtures)",
            category="memlearner/testing",
            inputs=[io.Int.Input("seed", default=3, min=0, max=2**31 - 1, tooltip="Seeds the random weights.")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(_tiny_models().tiny_wan22_vae(seed))


class TinyFixtureExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [RandomTextConditioning, TinyWan22VAE]


async def comfy_entrypoint():
    return TinyFixtureExtension()
