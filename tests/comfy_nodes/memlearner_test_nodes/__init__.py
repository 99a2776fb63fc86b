"""Test-only ComfyUI nodes. The umt5 text encoder cannot be shrunk, so tests condition on seeded random text."""

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


class RandomTextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerTestRandomConditioning",
            display_name="Random Text Conditioning (tests)",
            category="memlearner/testing",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, 512, 4096, generator=gen), {}]])


class TestExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [RandomTextConditioning]


async def comfy_entrypoint():
    return TestExtension()
