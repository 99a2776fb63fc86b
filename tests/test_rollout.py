"""Memory Rollout: long videos chunk after chunk, every context policy through the same query memory."""

import json

import pytest
import torch

import host

T = 2  # latent frames per chunk (5 video frames)
BUDGET = 3  # context_frames: full-resolution latent frames of context per chunk


def rollout(comfy, model, text_cond, **kw):
    args = dict(model=model, positive=text_cond[0], negative=text_cond[1], seed=7, steps=2, cfg=1.0,
                sampler_name="euler", scheduler="simple", width=64, height=64, chunk_frames=5, chunks=3,
                policy="all", context_frames=BUDGET, query_layers=2, camera="walk_and_revisit")
    args.update(kw)
    latent, report = comfy.run("MemLearnerMemoryRollout", **args)
    return latent["samples"], json.loads(report)


@pytest.mark.parametrize("policy", ["all", "recent", "fov", "framepack", "learned"])
def test_three_chunks_with_each_policy_are_finite_and_deterministic(comfy, wan_model, text_cond, policy):
    first, report = rollout(comfy, wan_model, text_cond, policy=policy)
    again, _ = rollout(comfy, wan_model, text_cond, policy=policy)
    assert first.shape == (1, 16, 3 * T, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert [r["first_frame"] for r in report] == [0, T, 2 * T]
    assert all(r["context_tokens"] <= BUDGET * 16 for r in report)  # 8x8 latent frame = 16 tokens
    assert report[2]["context"], "the third chunk reads history"


def test_chunks_see_their_history(comfy, wan_model, text_cond):
    with_memory, _ = rollout(comfy, wan_model, text_cond)
    history = with_memory[:, :, :T].clone()
    other, _ = rollout(comfy, wan_model, text_cond, first_chunk={"samples": history + 1.0}, chunks=1)
    same, _ = rollout(comfy, wan_model, text_cond, first_chunk={"samples": history}, chunks=1)
    assert torch.equal(same[:, :, T:], with_memory[:, :, T:2 * T])
    assert not torch.allclose(other[:, :, T:], same[:, :, T:])  # the chunk depends on the frames before it


@pytest.mark.parametrize("policy", ["all", "recent", "fov", "framepack", "learned"])
def test_continuing_from_the_first_chunk_equals_the_longer_rollout(comfy, wan_model, text_cond, policy):
    whole, _ = rollout(comfy, wan_model, text_cond, policy=policy)
    continued, report = rollout(comfy, wan_model, text_cond, policy=policy, chunks=2,
                                first_chunk={"samples": whole[:, :, :T].clone()})
    assert [r["first_frame"] for r in report] == [T, 2 * T]
    assert torch.equal(continued, whole)


def test_context_cost_stays_within_the_budget_as_history_grows(comfy, wan_model, text_cond):
    _, report = rollout(comfy, wan_model, text_cond, chunks=13, policy="framepack")  # saturates at 21 frames
    tokens = [r["context_tokens"] for r in report]
    assert max(tokens) <= BUDGET * 16 and tokens[-1] == tokens[-2]  # constant once history is long enough


def test_report_records_time_and_peak_memory_per_chunk(comfy, wan_model, text_cond):
    _, report = rollout(comfy, wan_model, text_cond, chunks=2)
    for r in report:
        assert r["seconds"] > 0 and r["peak_memory_mb"] > 0 and r["memory_kind"]


def test_reference_memory_on_the_model_is_kept_for_every_chunk(comfy, wan_model, encoder, text_cond):
    latents = {"samples": torch.randn(1, 16, 13, 16, 16, generator=torch.Generator().manual_seed(0))}
    memory = comfy.run("MemLearnerEncodeReferenceVideo", memory_encoder=encoder, latent=latents)[0]
    with_ref = comfy.run("MemLearnerApplyReferenceMemory", model=wan_model, memory=memory)[0]
    a, _ = rollout(comfy, with_ref, text_cond, chunks=2)
    b, _ = rollout(comfy, wan_model, text_cond, chunks=2)
    assert not torch.allclose(a[:, :, T:], b[:, :, T:])
    assert not torch.allclose(a[:, :, :T], b[:, :, :T])


def test_the_input_model_stays_unpatched(comfy, wan_model, text_cond):
    rollout(comfy, wan_model, text_cond, chunks=2)
    assert "memlearner" not in str(wan_model.wrappers) + str(wan_model.model_options)


@pytest.mark.parametrize("kw, message", [
    (dict(policy="fov", camera="none"), "fov policy .* camera trajectory"),
    (dict(policy="recent", context_frames=0), "needs a budget"),
    (dict(camera="custom JSON", trajectory="[[1, 2"), "not valid JSON|JSON"),
    (dict(camera="custom JSON", trajectory=json.dumps([[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]] * 2)),
     "2 poses but the video needs 6"),
    (dict(chunk_frames=6), "4k\\+1"),
    (dict(first_chunk={"samples": torch.zeros(1, 16, 2, 4, 4)}), "first_chunk must be"),
])
def test_bad_settings_are_clear_errors(comfy, wan_model, text_cond, kw, message):
    with pytest.raises(ValueError, match=message):
        rollout(comfy, wan_model, text_cond, **kw)


def test_interrupt_keeps_the_finished_chunks_and_the_model_clean(comfy, wan_model, text_cond):
    from comfy import model_management as mm
    from comfy.patcher_extension import WrappersMP

    calls = []

    def interrupt_in_second_chunk(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # chunk 1 took 2 steps of cfg 1
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    model = wan_model.clone()
    model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", interrupt_in_second_chunk)
    whole, _ = rollout(comfy, wan_model, text_cond)
    out_dir = host.Path(comfy.folder_paths.get_output_directory()) / "memlearner"
    before = set(out_dir.glob("rollout_interrupted*.latent")) if out_dir.is_dir() else set()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            rollout(comfy, model, text_cond)
    finally:
        mm.interrupt_current_processing(False)
    (saved,) = set(out_dir.glob("rollout_interrupted*.latent")) - before
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(saved))["latent_tensor"], whole[:, :, :T])
    assert "memlearner" not in str(model.wrappers) + str(model.model_options)
    saved.unlink()
