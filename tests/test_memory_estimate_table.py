"""The README's computed memory table (memlearner_core/memory_estimate.py) at the Wan2.1-1.3B and Wan2.2-TI2V-5B
shapes: token counts and ComfyUI's stock estimate worked out by hand."""

import pytest

from memlearner_core.memory_estimate import MemoryShape, comfy_stock_estimate, readme_table, token_counts


def test_a_5b_chunk_is_27280_tokens_per_sample():
    """121 frames at 1280x704 through the Wan2.2 VAE (4x, 16x16) and 1x2x2 patches: 31 x 22 x 40 tokens."""
    assert token_counts((2, 48, 31, 44, 80), MemoryShape(3072, 24)) == (2, 27_280, 0)
    assert token_counts((2, 48, 31, 44, 80), MemoryShape(3072, 24, query_layers=5, query_pool=2))[2] == 31 * 11 * 20


@pytest.mark.parametrize("latent, dim", [((2, 16, 21, 60, 104), 1536), ((2, 48, 31, 44, 80), 3072)])
def test_the_stock_estimate_is_comfys_formula(latent, dim):
    """``area * bytes * 0.01 * dim / 2222`` MiB (WAN21_T2V's memory_usage_factor, which WAN22_T2V inherits)."""
    b, _, t, h, w = latent
    assert comfy_stock_estimate(latent, dim, 2) == pytest.approx(b * t * h * w * 2 * 0.01 * dim / 2222 * 2**20)


def test_the_table_has_both_shapes_and_query_tokens_cost_one_stock_estimate():
    table = readme_table("wan2.2-ti2v-5b")
    stock = f"{comfy_stock_estimate((2, 48, 31, 44, 80), 3072, 2) / 2**20:,.0f} MiB"
    assert table.startswith("Wan2.2-TI2V-5B") and f"stock estimate {stock}" in table
    assert f"| query memory, 5 query layers, no history | {stock} | {stock} |" in table
    assert readme_table().startswith("Wan2.1-1.3B")


def test_the_learned_policy_keeps_one_layers_read_per_query_layer_and_every_frames_summary():
    from memlearner_core.memory_estimate import extra_bytes

    d, nc, summary, latent = 1536, 8 * 1560, 210 * 2, (2, 16, 21, 60, 104)
    routed = extra_bytes(0.0, latent, MemoryShape(d, 12, 5, context_tokens=nc, summary_tokens=summary), 2)
    n_p = 21 * 30 * 52
    assert routed["context"] == (11 * nc + 2 * 2 * (nc + n_p) + 2 * summary) * d * 2 + 2 * 2 * 12 * 1024 * summary * 4
    whole = extra_bytes(0.0, latent, MemoryShape(d, 12, 5, context_tokens=210 * 1560), 2)
    assert routed["context"] < whole["context"] / 10
