"""Video Score and Empty Text: measuring a rollout against the video it should have made, in RGB.

Video Score compares decoded frames with ground-truth frames (a held-out video the rollout re-renders, given its
first frames and camera path): PSNR and SSIM per frame and over the generated frames, and the two side by side.
Empty Text is the conditioning of a model trained without captions (``text = "none"`` in ``memlearner-train``).
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from memlearner_core import image_metrics as im

TEXT_DIM = 4096  # Wan2.1's text width (umt5-xxl)


class EmptyText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerEmptyText",
            display_name="Empty Text",
            category="memlearner",
            description="The conditioning of a model trained without text (memlearner-train with text = \"none\"): "
                        "one zero token of Wan2.1's text width. Connect it where a prompt would go.",
            inputs=[],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput([[torch.zeros(1, 1, TEXT_DIM), {}]])


class VideoScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerVideoScore",
            display_name="Video Score",
            category="memlearner",
            is_output_node=True,
            description="How close generated frames are to the ground truth, in RGB: PSNR (10 log10(1/MSE), "
                        f"capped at {im.PSNR_CAP:g} dB) and SSIM, per frame and over the frames from from_frame on "
                        "(the ones generated), shown on the node; and reference | generated side by side.",
            inputs=[
                io.Image.Input("images", tooltip="The decoded rollout (VAE Decode of Memory Rollout's latent)."),
                io.Image.Input("reference", tooltip="The ground-truth frames, the same size and count."),
                io.Int.Input("from_frame", default=0, min=0, max=100000,
                             tooltip="The first frame scored: the frames before it were given (first_chunk), not "
                                     "generated."),
                io.String.Input("label", default="", optional=True, tooltip="A name for this score in its report."),
                io.String.Input("rollout_report", optional=True, force_input=True,
                                tooltip="Memory Rollout's report: its chunks' context and timings, kept in this "
                                        "report beside the scores."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="JSON: psnr, ssim, per-frame psnr and ssim."),
                io.Image.Output(display_name="side_by_side", tooltip="Per frame: reference | generated."),
            ],
        )

    @classmethod
    def execute(cls, images, reference, from_frame, label="", rollout_report=None) -> io.NodeOutput:
        if images.shape != reference.shape:
            raise ValueError(f"Video Score: images {list(images.shape)} and reference {list(reference.shape)} must "
                             f"be the same frames and size; scale the reference to the rollout's width and height "
                             f"and give it the rollout's frame count")
        if from_frame >= images.shape[0]:
            raise ValueError(f"Video Score: from_frame {from_frame} leaves no frame to score (the video has "
                             f"{images.shape[0]}); set it to the number of given frames")
        x, y = images.float().cpu(), reference.float().cpu()
        if not torch.isfinite(x).all():
            raise ValueError("Video Score: images hold NaN or infinite values: the rollout that made them failed")
        gen, ref = x[from_frame:], y[from_frame:]
        whole = im.frame_scores(gen, ref)
        per_frame = [im.frame_scores(gen[i:i + 1], ref[i:i + 1]) for i in range(len(gen))]
        report = {"label": label, "from_frame": from_frame, "frames": len(gen), "psnr": whole["psnr"],
                  "ssim": whole["ssim"], "frame_psnr": [f["psnr"] for f in per_frame],
                  "frame_ssim": [f["ssim"] for f in per_frame]}
        if rollout_report:
            try:
                report["rollout"] = json.loads(rollout_report)
            except ValueError:
                raise ValueError("Video Score: rollout_report is not JSON; connect Memory Rollout's report "
                                 "output") from None
        text = json.dumps(report)
        return io.NodeOutput(text, torch.cat([y, x], dim=2), ui={"text": [text]})
