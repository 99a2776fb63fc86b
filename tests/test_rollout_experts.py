"""Memory Rollout with two experts (Wan2.2 A14B: high noise, then low noise): every chunk is the pack's Apply Query
Memory on each expert, then two KSamplerAdvanced passes over the split steps, as ComfyUI's A14B template samples;
without a second expert the rollout is one model for every step, as before."""

import json

import pytest
import torch

STEPS, SWITCH, CFG, SEED = 3, 2, 2.0, 7
T = 2  # latent frames per chunk (5 video frames at 64x64: 8x8 latents)


def parts(comfy, model, text_cond, steps=STEPS) -> dict:
    """ComfyUI's own nodes, as a user wires them into Memory Rollout."""
    return dict(noise=comfy.run("RandomNoise", noise_seed=SEED)[0], guider=guider(comfy, model, text_cond),
                sampler=comfy.run("KSamplerSelect", sampler_name="euler")[0],
                sigmas=comfy.run("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0)[0],
                chunk_latent=comfy.run("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1)[0])


def guider(comfy, model, text_cond):
    return comfy.run("CFGGuider", model=model, positive=text_cond[0], negative=text_cond[1], cfg=CFG)[0]


def history():
    """Latent frames the rollouts continue from, so every chunk has a history for Apply Query Memory to read."""
    return torch.randn(1, 16, T, 8, 8, generator=torch.Generator().manual_seed(3))


def rollout(comfy, high, text_cond, low=None, chunks=2, steps=STEPS, **kw):
    args = dict(**parts(comfy, high, text_cond, steps), chunks=chunks, policy="all", context_frames=0,
                query_layers=2, first_chunk={"samples": history()})
    if low is not None:
        args.update(guider_low=guider(comfy, low, text_cond), switch_step=SWITCH)
    args.update(kw)
    latent, report = comfy.run("MemLearnerRollout", **args)
    return latent["samples"], json.loads(report)


def reference(comfy, experts, text_cond, chunks=2, switch=SWITCH):
    """Per chunk: Apply Query Memory over all frames so far on each expert; with two experts KSamplerAdvanced
    steps 0..switch (noise added, leftover noise returned), then switch..end on the second (no noise added, the same
    seed); with one, KSampler. Chunk k draws with seed + k (the given frames are chunk 0)."""
    frames = history()
    settings = dict(steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="simple", positive=text_cond[0],
                    negative=text_cond[1])
    for k in range(1, chunks + 1):
        patched = [comfy.run("MemLearnerApplyQueryMemory", model=m, context={"samples": frames}, query_layers=2)[0]
                   for m in experts]
        empty = comfy.run("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1)[0]
        if len(patched) == 1:
            out = comfy.run("KSampler", model=patched[0], seed=SEED + k, latent_image=empty, denoise=1.0,
                            **settings)[0]
        else:
            noisy = comfy.run("KSamplerAdvanced", model=patched[0], add_noise="enable", noise_seed=SEED + k,
                              latent_image=empty, start_at_step=0, end_at_step=switch,
                              return_with_leftover_noise="enable", **settings)[0]
            out = comfy.run("KSamplerAdvanced", model=patched[1], add_noise="disable", noise_seed=SEED + k,
                            latent_image=noisy, start_at_step=switch, end_at_step=10000,
                            return_with_leftover_noise="disable", **settings)[0]
        frames = torch.cat([frames, out["samples"]], 2)
    return frames


def test_two_experts_are_apply_query_memory_on_each_then_two_ksampler_advanced_per_chunk(
        comfy, wan_model, wan_low_expert, text_cond):
    video, report = rollout(comfy, wan_model, text_cond, low=wan_low_expert)
    assert video.shape == (1, 16, 3 * T, 8, 8) and [r["first_frame"] for r in report] == [T, 2 * T]
    assert torch.equal(video, reference(comfy, [wan_model, wan_low_expert], text_cond))


def test_without_a_second_expert_each_chunk_is_one_model_for_every_step(comfy, wan_model, text_cond):
    video, _ = rollout(comfy, wan_model, text_cond)
    assert torch.equal(video, reference(comfy, [wan_model], text_cond))


def test_the_expert_inputs_at_their_declared_defaults_are_one_model(comfy, wan_model, text_cond):
    inputs = comfy.node("MemLearnerRollout").define_schema().inputs
    defaults = {i.id: i.as_dict()["default"] for i in inputs if i.id in ("switch_step", "query_weights_low")}
    assert len(defaults) == 2
    assert torch.equal(rollout(comfy, wan_model, text_cond, **defaults)[0], rollout(comfy, wan_model, text_cond)[0])


def test_handing_over_to_the_same_model_continues_the_same_video(comfy, wan_model, text_cond):
    """The second pass adds no noise and its query tokens draw with the chunk's seed: one model, split in two
    passes, is one model for every step (to float rounding)."""
    split, _ = rollout(comfy, wan_model, text_cond, low=wan_model)
    whole, _ = rollout(comfy, wan_model, text_cond)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


def test_switch_step_moves_the_handover(comfy, wan_model, wan_low_expert, text_cond):
    at_1, _ = rollout(comfy, wan_model, text_cond, low=wan_low_expert, switch_step=1)
    at_2, _ = rollout(comfy, wan_model, text_cond, low=wan_low_expert, switch_step=2)
    assert (at_1[:, :, T:] - at_2[:, :, T:]).abs().max() > 1e-2


def test_the_low_noise_expert_samples_the_steps_from_switch_step_on(comfy, wan_model, wan_low_expert, text_cond):
    experts, _ = rollout(comfy, wan_model, text_cond, low=wan_low_expert)
    high_only, _ = rollout(comfy, wan_model, text_cond, low=wan_model)
    assert (experts[:, :, T:] - high_only[:, :, T:]).abs().max() > 1e-2


def test_swapping_the_experts_changes_the_video(comfy, wan_model, wan_low_expert, text_cond):
    experts, _ = rollout(comfy, wan_model, text_cond, low=wan_low_expert)
    swapped, _ = rollout(comfy, wan_low_expert, text_cond, low=wan_model)
    assert (experts[:, :, T:] - swapped[:, :, T:]).abs().max() > 1e-2


def test_the_progress_bar_counts_every_step_of_both_experts_once(comfy, wan_model, wan_low_expert, text_cond,
                                                                 monkeypatch):
    import comfy.utils as comfy_utils

    seen = []
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append(
        (value, total)))
    rollout(comfy, wan_model, text_cond, low=wan_low_expert)
    # newer hosts throttle the hook, so not every step reaches it: the values rise to the total, never past it
    values = [v for v, _ in seen]
    assert {t for _, t in seen} == {2 * STEPS} and values[-1] == 2 * STEPS
    assert values == sorted(set(values))


def test_both_input_models_stay_unpatched(comfy, wan_model, wan_low_expert, text_cond):
    rollout(comfy, wan_model, text_cond, low=wan_low_expert)
    for model in (wan_model, wan_low_expert):
        assert "memlearner" not in str(model.wrappers) + str(model.model_options)


def query_weights_file(comfy, name, family):
    from memlearner_core.camera import CameraEmbedding
    from memlearner_core.checkpoint_io import save_query_weights

    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    save_query_weights(f"{folder}/{name}", CameraEmbedding(256).state_dict(), 2, model_family=family)
    return name


@pytest.mark.parametrize("kw, message", [
    (dict(switch_step=0), "guider_low is connected but switch_step is 0: set switch_step"),
    (dict(switch_step=STEPS), f"switch_step must be from 1 to {STEPS - 1} for the sigmas' {STEPS} steps, got 3"),
    (dict(low=None, switch_step=2), "switch_step is 2 but no guider_low is connected"),
    (dict(low=None, query_weights_low="none"), "query_weights_low is none but no guider_low is connected"),
])
def test_a_switch_step_that_does_not_fit_the_experts_is_refused_in_one_line(comfy, wan_model, wan_low_expert,
                                                                            text_cond, kw, message):
    kw = {"low": wan_low_expert, **kw}
    with pytest.raises(ValueError, match=message) as refused:
        rollout(comfy, wan_model, text_cond, **kw)
    assert "\n" not in str(refused.value)


def test_a_second_expert_of_another_family_is_refused_in_one_line(comfy, wan_model, wan22_5b, text_cond):
    with pytest.raises(ValueError, match="guider_low's model is Wan2.2 TI2V-5B but guider's is Wan2.1 text-to-video"
                                         ": connect the low-noise expert") as refused:
        rollout(comfy, wan_model, text_cond, low=wan22_5b)
    assert "\n" not in str(refused.value)


def test_query_weights_of_another_family_are_refused(comfy, wan_model, text_cond):
    name = query_weights_file(comfy, "rollout_q5b.safetensors", "wan2.2-ti2v-5b")
    with pytest.raises(ValueError, match=f"query_weights {name} was fine-tuned on wan2.2-ti2v-5b, but the model is "
                                         "wan2.1"):
        rollout(comfy, wan_model, text_cond, query_weights=name)


def test_query_weights_low_of_another_family_are_refused_naming_that_input(comfy, wan_model, wan_low_expert,
                                                                           text_cond):
    name = query_weights_file(comfy, "rollout_low_q5b.safetensors", "wan2.2-ti2v-5b")
    with pytest.raises(ValueError, match=f"query_weights_low {name} was fine-tuned on wan2.2-ti2v-5b"):
        rollout(comfy, wan_model, text_cond, low=wan_low_expert, query_weights_low=name)


def test_each_expert_reads_its_own_query_weights(comfy, wan_model, wan_low_expert, text_cond):
    from memlearner_core.camera import CameraEmbedding
    from memlearner_core.checkpoint_io import save_query_weights

    folder = comfy.folder_paths.get_folder_paths("memlearner")[0]
    for name, seed in (("rollout_high.safetensors", 1), ("rollout_low.safetensors", 2)):
        torch.manual_seed(seed)
        save_query_weights(f"{folder}/{name}", CameraEmbedding(256).state_dict(), 2)
    camera = comfy.run("MemLearnerCameraPath", camera="walk_and_revisit", trajectory='{"distance": 2}')[0]
    run = dict(low=wan_low_expert, camera_path=camera, query_weights="rollout_high.safetensors")
    same, _ = rollout(comfy, wan_model, text_cond, **run)
    own, _ = rollout(comfy, wan_model, text_cond, **run, query_weights_low="rollout_low.safetensors")
    assert (same[:, :, T:] - own[:, :, T:]).abs().max() > 1e-2


@pytest.mark.parametrize("values, message", [
    (dict(switch_step=0, input_types={"guider_low": "GUIDER"}), "guider_low is connected but switch_step is 0"),
    (dict(switch_step=10, input_types={}), "switch_step is 10 but no guider_low is connected"),
])
def test_validate_inputs_refuses_a_switch_step_that_does_not_fit_when_queued(comfy, values, message):
    result = comfy.node("MemLearnerRollout").validate_inputs(policy="all", context_frames=0, query_layers=2,
                                                            **values)
    assert isinstance(result, str) and message in result, result


def test_validate_inputs_passes_two_experts_with_a_switch_step(comfy):
    assert comfy.node("MemLearnerRollout").validate_inputs(
        policy="all", context_frames=0, query_layers=2, switch_step=10, query_weights_low="same as query_weights",
        input_types={"guider_low": "GUIDER"}) is True


def test_the_legacy_node_refuses_query_weights_of_another_family_too(comfy, wan_model, text_cond):
    name = query_weights_file(comfy, "legacy_q5b.safetensors", "wan2.2-ti2v-5b")
    with pytest.raises(ValueError, match=f"query_weights {name} was fine-tuned on wan2.2-ti2v-5b"):
        comfy.run("MemLearnerMemoryRollout", model=wan_model, positive=text_cond[0], negative=text_cond[1], seed=7,
                  steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", width=64, height=64, chunk_frames=5,
                  chunks=1, policy="all", context_frames=0, query_layers=2, query_weights=name)


def test_the_learned_policy_reports_what_each_expert_read(comfy, wan_model, wan_low_expert, text_cond):
    _, report = rollout(comfy, wan_model, text_cond, low=wan_low_expert, chunks=3, policy="learned",
                        context_frames=1)
    for r in report:
        assert sorted(r["routed"]) == sorted(r["routed_low"]) == ["0", "1"]
        read = {i for frames in [*r["routed"].values(), *r["routed_low"].values()] for i in frames}
        assert [i for i, _ in r["context"]] == sorted(read)
        assert all(len(f) == 1 for f in [*r["routed"].values(), *r["routed_low"].values()])
    _, alone = rollout(comfy, wan_model, text_cond, chunks=1, policy="learned", context_frames=1)
    assert alone[0]["routed_low"] is None
