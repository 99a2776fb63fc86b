"""The tiny fixtures' text conditioning, as a ComfyUI custom node (loaded from ``tiny_models.TINY_NODES``).

ComfyUI's loader builds the umt5 text encoder at its full 5.7B size, so graphs on the tiny fixtures condition on
seeded random text instead (the demo, the tests).
"""

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


class TinyFixtureExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [RandomTextConditioning]


async def comfy_entrypoint():
    return TinyFixtureExtension()
