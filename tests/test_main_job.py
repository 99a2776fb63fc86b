"""The main job, ``bash scripts/run.sh``: ``memlearner_host.demo.run_demo`` end to end (its own ComfyUI server, the
shipped both-memories and revisit workflows), on the tiny fixtures, run once for the module; then what it wrote for
a person to look at: the revisit contact sheet and labelled video, and the printout that says where to look."""

import contextlib
import io
import re

import numpy as np
import pytest
from PIL import Image

from memlearner_core import revisit_world as rw
from memlearner_host import contact_sheet as cs
from memlearner_host import demo

import host
import tiny_models

pytestmark = pytest.mark.server
REVISIT_FRAMES = [12, 13, 14, 15]  # pan_and_return: the way back over what the 4 given frames showed


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One run of the main job: (workdir, returned files, printout)."""
    work = tmp_path_factory.mktemp("main_job")
    real = demo.real_models_present(host.comfy_path() / "models")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # Without the real weights this is exactly run.sh's path; with them, the same path forced onto the tiny fixtures.
        files = demo.run_demo(work, timeout=900, tiny=True if real else None)
    return work, files, out.getvalue()


@pytest.fixture(scope="module")
def compared(job):
    """The demo's revisit world and rollouts, read back from the latents it saved: (case, Comparison)."""
    work, _, _ = job
    folder = work / "output" / "memlearner" / "latents"
    latents = {p: next(folder.glob(f"revisit_{p}_*.latent")) for p in demo.POLICIES}
    return demo.comparison(demo.with_comparison(demo.workflows().revisit_world()), latents)


@pytest.fixture(scope="module")
def sheet(job):
    work, _, _ = job
    return np.asarray(Image.open(work / "output" / "memlearner" / "revisit_compare.png").convert("RGB"))


@pytest.fixture(scope="module")
def video(job):
    from comfy_api.latest import InputImpl

    work, _, _ = job
    frames = InputImpl.VideoFromFile(str(work / "output" / "memlearner" / "revisit_compare.mp4")).get_components()
    return (frames.images.numpy() * 255).round().astype(np.float32)


def truth_frames(scale: int) -> np.ndarray:
    """The held-out world's ground truth, rendered as Revisit Score renders it (64 px), nearest-upscaled."""
    world = demo.workflows().revisit_world()["world"]["inputs"]
    case = rw.evaluation_case(world["path"], world["seed"], 8, 8)
    factors, bias = demo.comfy_preview_factors()
    return cs.upscale(cs.to_uint8(rw.latent_to_rgb(case.truth, factors, bias)), scale)


def sheet_cell(sheet: np.ndarray, comp, row: int, column: int) -> np.ndarray:
    frames = cs.chosen_frames(comp)
    side = cs.sheet_layout(comp, frames)[0]
    x, y = cs.cell_origin(comp, frames, row, column)
    return sheet[y:y + side, x:x + side]


def is_colour(pixels: np.ndarray, colour, tol: float) -> bool:
    return bool(np.abs(pixels.reshape(-1, 3).astype(np.float32).mean(0) - np.array(colour)).max() <= tol)


def test_main_job_runs_the_both_memories_and_revisit_workflows_and_saves_their_videos(job):
    work, files, printed = job
    assert (work / "tiny_models" / "diffusion_models" / tiny_models.WAN_FILE).is_file()
    assert [f.name for f in files[:2]] == ["revisit_compare.png", "revisit_compare.mp4"]
    assert sorted(f.name.rsplit("_", 2)[0] for f in files[2:]) == ["chunk1", "chunk2", "doom_all", "doom_no_memory",
                                                                   "revisit_all", "revisit_recent"]
    assert "all history: PSNR" in printed and "window: PSNR" in printed and "no memory: PSNR" in printed
    from comfy_api.latest import InputImpl

    for f in files:
        assert f.is_file() and f.stat().st_size > 0 and f.is_relative_to(work / "output" / "memlearner")
    for f in files[2:]:
        frames = InputImpl.VideoFromFile(str(f)).get_components()
        if f.name.startswith("doom"):  # the held-out video | generated, at the model's 128x96, every frame
            assert frames.images.shape == (61, 96, 2 * 128, 3)
            continue
        width = 64 if f.name.startswith("chunk") else 64 + 4 + 64  # revisit: ground truth | generated
        assert frames.images.shape[0] > 1 and frames.images.shape[1:] == (64, width, 3)


def test_printout_gives_the_held_out_doom_returns_figures_with_memory_and_without(job):
    _, _, printed = job
    block = printed[printed.index("a real 3D world (ViZDoom"):]
    assert "MAP21, held out" in block and "MAP01-20 only" in block
    on, off = (float(v) for v in re.search(r"memory on (-?[\d.]+) dB, memory off (-?[\d.]+) dB", block).groups())
    assert 0 < on < 60 and 0 < off < 60  # measured, not asserted better: see benchmarks/results/doom/results.md
    assert "benchmarks/results/doom/results.md" in block


def test_sheet_has_a_row_per_column_and_a_column_per_chosen_frame(sheet, compared):
    _, comp = compared
    assert comp.keys == ["truth", "none", "recent", "all"] and comp.revisit == REVISIT_FRAMES
    frames = cs.chosen_frames(comp)
    assert frames == [3, 6, 9, *REVISIT_FRAMES]
    _, width, height = cs.sheet_layout(comp, frames)
    assert sheet.shape == (height, width, 3) == (1114, 1626, 3)


def test_sheet_ground_truth_row_is_the_ground_truth_frames_upscaled(sheet, compared):
    _, comp = compared
    truth = truth_frames(cs.SHEET_SCALE)
    for c, t in enumerate(cs.chosen_frames(comp)):
        assert np.array_equal(sheet_cell(sheet, comp, 0, c), truth[t])


def test_sheet_rows_are_the_policies_rollouts_and_differ_on_generated_frames(sheet, compared):
    _, comp = compared
    factors, bias = demo.comfy_preview_factors()
    rendered = cs.renderings(comp, factors, bias, cs.SHEET_SCALE)
    frames = cs.chosen_frames(comp)
    for r, key in enumerate(comp.keys):
        for c, t in enumerate(frames):
            assert np.array_equal(sheet_cell(sheet, comp, r, c), rendered[key][t]), (key, t)
    for c, t in enumerate(frames[1:], 1):  # generated frames: every row its own
        cells = [sheet_cell(sheet, comp, r, c) for r in range(4)]
        assert all(not np.array_equal(a, b) for i, a in enumerate(cells) for b in cells[i + 1:]), t


def test_sheet_rows_carry_distinct_titles(sheet, compared):
    _, comp = compared
    frames = cs.chosen_frames(comp)
    side = cs.sheet_layout(comp, frames)[0]
    labels = []
    for r in range(4):
        _, y = cs.cell_origin(comp, frames, r, 0)
        label = sheet[y + side // 2 - 22:y + side // 2, cs.SHEET_MARGIN:cs.SHEET_MARGIN + cs.SHEET_LABEL - 10]
        assert (np.abs(label.astype(int) - cs.TEXT).max(-1) < 40).sum() > 50, r  # text drawn there
        labels.append(label)
    assert all(not np.array_equal(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])


def test_sheet_frames_revisit_cells_in_orange_exactly_on_revisit_frames(sheet, compared):
    _, comp = compared
    frames = cs.chosen_frames(comp)
    b = cs.SHEET_BORDER
    for r in range(4):
        for c, t in enumerate(frames):
            x, y = cs.cell_origin(comp, frames, r, c)
            band = sheet[y - b:y, x:x + 40]  # the strip just above the cell
            assert is_colour(band, cs.REVISIT_COLOUR, 0) == (t in REVISIT_FRAMES), (r, t)


def test_video_is_every_frame_with_the_four_columns_upscaled(video, compared):
    _, comp = compared
    side, width, height = cs.video_layout(comp)
    assert video.shape == (16, height, width, 3) and side == 4 * 64
    truth = truth_frames(cs.VIDEO_SCALE).astype(np.float32)
    factors, bias = demo.comfy_preview_factors()
    rendered = cs.renderings(comp, factors, bias, cs.VIDEO_SCALE)
    for t in range(16):
        panels = []
        for c in range(4):
            x, y = cs.panel_origin(comp, c)
            panels.append(video[t, y:y + side, x:x + side])
        assert np.abs(panels[0] - truth[t]).mean() < 6, t  # H.264: close, not exact
        for c, key in enumerate(comp.keys):  # each column is its own policy's frame (or one equal to it)
            errors = [np.abs(panels[c] - rendered[k][t]).mean() for k in comp.keys]
            assert errors[c] < 6 and errors[c] == min(errors), (t, key, errors)


def test_video_marks_revisit_frames_in_orange_exactly(video, compared):
    _, comp = compared
    band = video[:, 2:cs.BAND - 2, video.shape[2] // 4:3 * video.shape[2] // 4]  # the top band's middle
    marked = [t for t in range(16) if is_colour(band[t], cs.REVISIT_COLOUR, 30)]
    assert marked == REVISIT_FRAMES


def test_printout_says_where_to_look_and_what_the_numbers_mean(job):
    work, _, printed = job
    guide = printed[printed.index("what to look at:"):]
    assert f"open first: {work / 'output' / 'memlearner' / 'revisit_compare.png'}" in guide
    assert str(work / "output" / "memlearner" / "revisit_compare.mp4") in guide
    assert "ground truth | no memory | window (last 4) | all history" in guide
    assert "revisit frames: 12-15" in guide and "frames 0-3 are given" in guide
    assert "PSNR against ground truth" in guide and "over no memory" in guide
    assert "memlearner_host/revisit_model/" in guide


def test_printout_labels_the_random_weight_chunks_as_a_plumbing_check(job):
    _, files, printed = job
    lines = printed.splitlines()
    check = next(i for i, line in enumerate(lines) if "plumbing check: random weights, noise expected" in line)
    chunks = [str(f) for f in files if f.name.startswith("chunk")]
    assert [line.removeprefix("[demo]").strip() for line in lines[check + 1:check + 3]] == chunks


def test_an_older_toy_model_of_the_same_size_is_replaced(tmp_path):
    """A demo folder holding an earlier toy model (the same architecture, so the same size) gets the shipped one."""
    from memlearner_host import tiny_models as shipped

    shipped.copy_toy_model(tmp_path)
    copy = next(tmp_path.glob("diffusion_models/*.safetensors"))
    original = copy.read_bytes()
    copy.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    shipped.copy_toy_model(tmp_path)
    assert copy.read_bytes() == original
