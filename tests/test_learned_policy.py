"""The learned context policy: each query layer scores every history frame by the attention mass its own queries
give the frame's summary, and reads only the budget's best frames at full resolution."""

import json

import pytest
import torch
from test_query_memory import inputs

from memlearner_core import context_routing as routing
from memlearner_core.context_tokens import ContextSegment, ContextSpec

import host
from forward import model_forward, rel_err


def test_frame_mass_is_the_softmax_over_summary_tokens_summed_per_frame(seeded):
    b, heads, d, nq = 2, 2, 4, 5
    token_frame = torch.tensor([0, 0, 1, 2, 2, 2])
    q, k = torch.randn(b, nq, heads * d), torch.randn(1, len(token_frame), heads * d)
    want = torch.zeros(3)
    for bi in range(b):
        for h in range(heads):
            for i in range(nq):
                logits = torch.stack([q[bi, i, h * d:(h + 1) * d] @ k[0, j, h * d:(h + 1) * d] / d**0.5
                                      for j in range(len(token_frame))])
                for j, p in enumerate(torch.softmax(logits, 0)):
                    want[token_frame[j]] += p / (b * heads * nq)
    got = routing.frame_mass(q, k, token_frame, 3, heads)
    assert torch.allclose(got, want, atol=1e-6) and abs(float(got.sum()) - 1) < 1e-6


def test_route_keeps_the_budget_best_frames_in_temporal_order_newest_on_ties():
    assert routing.route(torch.tensor([0.1, 0.4, 0.2, 0.3]), 2) == [1, 3]
    assert routing.route(torch.tensor([0.25, 0.25, 0.25, 0.25]), 3) == [1, 2, 3]
    assert routing.route(torch.tensor([0.5, 0.5]), 5) == [0, 1]


@pytest.mark.parametrize("hw, pool, tokens", [((8, 8), 4, 1), ((60, 104), 26, 2), ((44, 80), 20, 2), ((2, 2), 1, 1),
                                              ((3, 9), 1, 10)])
def test_a_frame_summary_is_pooled_to_whole_patches_as_coarse_as_the_frame_allows(hw, pool, tokens):
    assert routing.summary_pool(*hw) == pool and routing.summary_tokens(*hw) == tokens


def test_the_scoring_cost_grows_with_frames_not_with_their_tokens():
    small, large = routing.scoring_flops(10, 1, 64, 256), routing.scoring_flops(20, 1, 64, 256)
    assert large == 2 * small


def spec(frames: int, seed: int = 3) -> ContextSpec:
    latent = torch.randn(16, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    return ContextSpec([ContextSegment(latent, torch.arange(-frames, 0))])


def query_forward(mp, model, context, layers=1, route=0, seed=9):
    query = mp.QueryMemory(layers, mp.context_in_model_space(context, model), route_frames=route)
    x, t, txt = inputs(2)
    return model_forward(mp.apply_memory(model, query=query), x, t, txt, [0, 1], run_seed=seed), query


def test_a_query_layer_routed_to_some_frames_equals_reading_only_those_frames(comfy, wan_model):
    mp = host.pack("nodes.memory_patch")
    out, query = query_forward(mp, wan_model, spec(6), route=2)
    (frames,) = query.routed.values()
    assert len(frames) == 2
    alone, _ = query_forward(mp, wan_model, routing.picked(spec(6), frames))
    assert rel_err(out, alone) < 1e-6


def test_each_query_layer_reads_the_frames_its_queries_give_most_mass(comfy, wan_model, monkeypatch):
    mp = host.pack("nodes.memory_patch")
    masses = []
    real = routing.frame_mass
    monkeypatch.setattr(mp.routing, "frame_mass", lambda *a: masses.append(real(*a)) or masses[-1])
    _, query = query_forward(mp, wan_model, spec(7), layers=3, route=3)
    assert sorted(query.routed) == [0, 1, 2] and len(masses) == 6  # 3 layers x 2 CFG branches, cond first
    for layer, mass in zip(sorted(query.routed), masses[::2], strict=True):
        assert query.routed[layer] == sorted(torch.topk(mass, 3).indices.tolist())


def test_a_budget_of_the_whole_history_reads_every_frame(comfy, wan_model):
    mp = host.pack("nodes.memory_patch")
    routed, query = query_forward(mp, wan_model, spec(4), layers=2, route=4)
    every, _ = query_forward(mp, wan_model, spec(4), layers=2)
    assert torch.equal(routed, every) and query.routed == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_memory_rollout_reads_the_budget_in_each_query_layer(comfy, wan_model, text_cond):
    latent, report = comfy.run("MemLearnerMemoryRollout", model=wan_model, positive=text_cond[0],
                               negative=text_cond[1], seed=7, steps=2, cfg=1.0, sampler_name="euler",
                               scheduler="simple", width=64, height=64, chunk_frames=5, chunks=4, policy="learned",
                               context_frames=3, query_layers=2, camera="walk_and_revisit")
    report = json.loads(report)
    assert torch.isfinite(latent["samples"]).all()
    assert report[0]["routed"] == {} and report[0]["context"] == []
    for r in report[1:]:
        history = r["first_frame"]
        assert sorted(r["routed"]) == ["0", "1"]
        assert all(len(f) == min(3, history) and set(f) <= set(range(history)) for f in r["routed"].values())
        assert r["context_tokens"] == min(3, history) * 16  # each layer reads at most 3 frames of 16 tokens


@pytest.mark.parametrize("cache", [True, False])
def test_each_cfg_branch_routes_on_its_own_queries_batched_or_one_forward_each(comfy, wan_model, cache, monkeypatch):
    mp = host.pack("nodes.memory_patch")
    picks = []
    real = routing.ranked_frames
    monkeypatch.setattr(mp.routing, "ranked_frames", lambda *a: picks.append(real(*a)) or picks[-1])
    query = mp.QueryMemory(4, mp.context_in_model_space(spec(12), wan_model), route_frames=3, cache_context=cache)
    model = mp.apply_memory(wan_model, query=query)
    x, t, txt = inputs(2)
    txt[1] = -20 * txt[0]  # prompts far apart, so the branches' queries rank the frames differently
    batched = model_forward(model, x, t, txt, [0, 1], run_seed=9)
    assert any(a != b for a, b in zip(picks[::2], picks[1::2], strict=True))  # per layer: cond, uncond
    run = mp.RunState(9)  # low VRAM: the same run, one branch per forward, uncond first
    uncond = model_forward(model, x[1:], t[1:], txt[1:], [1], run=run)
    cond = model_forward(model, x[:1], t[:1], txt[:1], [0], run=run)
    assert rel_err(torch.cat([cond, uncond]), batched) < 1e-5
