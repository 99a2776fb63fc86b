"""The main job, ``bash scripts/run.sh``: ``memlearner_host.demo.run_demo`` end to end (its own ComfyUI server, the
shipped both-memories workflow), on the tiny fixtures."""

import pytest

from memlearner_host import demo

import host
import tiny_models

pytestmark = pytest.mark.server


def test_main_job_runs_the_both_memories_and_revisit_workflows_and_saves_their_videos(tmp_path, capsys):
    real = demo.real_models_present(host.comfy_path() / "models")
    # Without the real weights this is exactly run.sh's path; with them, the same path forced onto the tiny fixtures.
    files = demo.run_demo(tmp_path, timeout=900, tiny=True if real else None)
    assert (tmp_path / "tiny_models" / "diffusion_models" / tiny_models.WAN_FILE).is_file()
    assert sorted(f.name.rsplit("_", 2)[0] for f in files) == ["chunk1", "chunk2", "revisit_all", "revisit_recent"]
    printed = capsys.readouterr().out
    assert "all: PSNR" in printed and "recent: PSNR" in printed
    from comfy_api.latest import InputImpl

    for f in files:
        assert f.is_file() and f.stat().st_size > 0 and f.is_relative_to(tmp_path / "output" / "memlearner")
        frames = InputImpl.VideoFromFile(str(f)).get_components()
        width = 64 if f.name.startswith("chunk") else 64 + 4 + 64  # revisit: ground truth | generated
        assert frames.images.shape[0] > 1 and frames.images.shape[1:] == (64, width, 3)
