"""Video Score and Empty Text: a rollout measured in RGB against the video it should have made."""

import json

import pytest
import torch

from memlearner_core.image_metrics import PSNR_CAP


def test_empty_text_is_one_zero_token_of_wan_text_width(comfy):
    (cond,) = comfy.run("MemLearnerEmptyText")
    assert cond[0][0].shape == (1, 1, 4096) and not cond[0][0].any()


def test_video_score_scores_only_the_frames_from_from_frame_on(comfy):
    ref = torch.rand(6, 16, 16, 3)
    gen = ref.clone()
    gen[:3] = 0.5  # the given frames differ: not scored
    gen[3:] = torch.where(ref[3:] > 0.5, ref[3:] - 0.1, ref[3:] + 0.1)  # every value off by 0.1, inside 0..1
    text, side = comfy.run("MemLearnerVideoScore", images=gen, reference=ref, from_frame=3, label="x")
    report = json.loads(text)
    assert report["psnr"] == pytest.approx(20.0, abs=1e-3)  # every value off by 0.1
    assert report["frames"] == 3 and len(report["frame_psnr"]) == 3 and report["label"] == "x"
    assert side.shape == (6, 16, 32, 3) and torch.equal(side[:, :, :16], ref)


def test_identical_frames_score_the_cap(comfy):
    ref = torch.rand(4, 16, 16, 3)
    report = json.loads(comfy.run("MemLearnerVideoScore", images=ref.clone(), reference=ref, from_frame=1)[0])
    assert report["psnr"] == PSNR_CAP and report["ssim"] == pytest.approx(1.0)


def test_the_rollout_report_is_kept_beside_the_scores(comfy):
    ref = torch.rand(2, 16, 16, 3)
    rollout = [{"chunk": 0, "seconds": 0.5}]
    report = json.loads(comfy.run("MemLearnerVideoScore", images=ref, reference=ref, from_frame=0,
                                  rollout_report=json.dumps(rollout))[0])
    assert report["rollout"] == rollout


@pytest.mark.parametrize("images, reference, from_frame, message", [
    (torch.rand(4, 16, 16, 3), torch.rand(4, 16, 12, 3), 0, "same frames and size"),
    (torch.rand(4, 16, 16, 3), torch.rand(4, 16, 16, 3), 4, "leaves no frame to score"),
    (torch.full((4, 16, 16, 3), float("nan")), torch.rand(4, 16, 16, 3), 0, "NaN"),
])
def test_bad_input_is_refused_naming_it(comfy, images, reference, from_frame, message):
    with pytest.raises(ValueError, match=message):
        comfy.run("MemLearnerVideoScore", images=images, reference=reference, from_frame=from_frame)


def test_a_rollout_report_that_is_not_json_is_refused(comfy):
    ref = torch.rand(2, 16, 16, 3)
    with pytest.raises(ValueError, match="rollout_report is not JSON"):
        comfy.run("MemLearnerVideoScore", images=ref, reference=ref, from_frame=0, rollout_report="{oops")
