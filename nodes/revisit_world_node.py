"""Revisit World and Revisit Score: a toy world with exact ground truth, to see query memory remember on any machine.

Revisit World gives a Memory Rollout everything it needs for one of the core's evaluation paths (ground-truth history
frames, the camera path, the empty text the toy models were trained with); Revisit Score compares what the rollout
generated with the truth, in the model's latent space, and renders both through ComfyUI's Wan2.1 preview factors.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from memlearner_core import revisit_world as rw
from memlearner_core.rollout import latent_frames
from memlearner_core.trajectory import trajectory_json

from . import comfy_adapter as wa
from .comfy_types import REVISIT_WORLD

CHUNK_FRAMES = 5  # video frames per rollout chunk: 2 latent frames
LATENT_SIDE = 8  # latent pixels per side: 64 x 64 video


class RevisitWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerRevisitWorld",
            display_name="Revisit World (toy)",
            category="memlearner/toy world",
            description="A seeded toy world in Wan2.1's latent space (a panorama with different content at every "
                        "place) and a camera path that comes back to what it saw. Outputs the first frames as "
                        "ground-truth history for Memory Rollout's first_chunk, the camera path for its custom "
                        "JSON trajectory, and the chunks left to generate. For the toy models trained by "
                        "benchmarks/revisit_world.py (64x64, chunk_frames 5).",
            inputs=[
                io.Int.Input("seed", default=10_000_000, min=0, max=2**31 - 1,
                             tooltip="Which world. The toy models were trained on seeds below 10,000,000."),
                wa.combo_input("path", options=list(rw.EVALUATION_PATHS), default="pan_and_return",
                               tooltip="pan_and_return: turn 180 degrees and back; walk_and_revisit: walk towards "
                                       "the wall and back; occluder: a wall hides part of the world on two legs; "
                                       "moving_object: a block moves along the world."),
            ],
            outputs=[
                REVISIT_WORLD.Output(display_name="world", tooltip="For Revisit Score."),
                io.Latent.Output(display_name="history", tooltip="Ground-truth first frames: Memory Rollout's first_chunk."),
                io.String.Output(display_name="trajectory", tooltip="Memory Rollout's custom JSON camera path."),
                io.Int.Output(display_name="chunks", tooltip="Memory Rollout's chunks (of 5 video frames each)."),
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The empty text the toy models were trained with."),
            ],
        )

    @classmethod
    def execute(cls, seed, path) -> io.NodeOutput:
        case = rw.evaluation_case(path, int(seed), LATENT_SIDE, LATENT_SIDE)
        history = wa.wan21_latent_out(case.truth[:, :case.history]).unsqueeze(0)
        text = [[torch.zeros(1, 1, 4096), {}]]
        return io.NodeOutput(case, {"samples": history}, trajectory_json(case.poses),
                             case.generated_frames // latent_frames(CHUNK_FRAMES), text)


class RevisitScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerRevisitScore",
            display_name="Revisit Score (toy)",
            category="memlearner/toy world",
            is_output_node=True,
            description="How well a generated video remembers the toy world: PSNR (10 log10(1/MSE) in the model's "
                        "latent space, capped at 40 dB; 0 dB is guessing the mean) on places the history showed "
                        "(revisit) and on places nothing showed before (new), shown on the node, and the frames "
                        "side by side (ground truth | generated) through ComfyUI's Wan2.1 preview colours.",
            inputs=[
                REVISIT_WORLD.Input("world"),
                io.Latent.Input("latent", tooltip="Memory Rollout's output: the history, then the generated frames."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="JSON: revisit_psnr, new_psnr and pixel counts."),
                io.Image.Output(display_name="side_by_side", tooltip="Per frame: ground truth | generated."),
            ],
        )

    @classmethod
    def execute(cls, world: rw.RevisitCase, latent) -> io.NodeOutput:
        samples = latent["samples"]
        want = (1, 16, world.truth.shape[1], *world.truth.shape[2:])
        if tuple(samples.shape) != want:
            raise ValueError(f"latent must be the whole rollout of this world {list(want)} (history and generated "
                             f"frames), got {list(samples.shape)}; connect Memory Rollout's latent")
        generated = wa.wan21_latent_in(samples[0].float())
        if not torch.isfinite(generated).all():
            raise ValueError("latent holds NaN or infinite values: the rollout that made it failed")
        err = rw.squared_error(generated[:, world.history:], world)
        report = {"path": world.path, "history_frames": world.history,
                  "generated_frames": world.generated_frames}
        for name in ("revisit", "new"):
            mask = world.labels[name]
            report[f"{name}_psnr"] = rw.psnr(float(err[mask].sum()), int(mask.sum()))
            report[f"{name}_pixels"] = int(mask.sum())
        factors, bias = wa.wan21_preview_factors()
        text = json.dumps(report)
        return io.NodeOutput(text, rw.side_by_side([world.truth, generated], factors, bias), ui={"text": [text]})
