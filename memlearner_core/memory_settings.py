"""Checks every host runs before it applies memory to a Wan model: the same refusals, in the same words."""

from __future__ import annotations


def check_memory_settings(dim: int, n_blocks: int, memory=None, query=None) -> None:
    """Raise ``ValueError`` unless ``memory`` (anything with ``.width``) and ``query`` (anything with
    ``query_layers``, ``query_pool`` and ``camera``) fit a Wan model ``dim`` wide with ``n_blocks`` blocks."""
    if memory is not None and memory.width != dim:
        raise ValueError(f"the memory encoder makes {memory.width}-wide tokens but this Wan model is {dim} wide "
                         f"(1.3B: 1536, 14B: 5120); load the encoder trained for this model")
    if query is None:
        return
    if not 1 <= query.query_layers <= n_blocks:
        raise ValueError(f"query_layers must be between 1 and {n_blocks} (this model has {n_blocks} blocks), "
                         f"got {query.query_layers}")
    if query.query_pool < 1:
        raise ValueError(f"query_pool must be 1 (one query token per predicted token) or more, got {query.query_pool}")
    if query.camera is not None and query.camera.proj.out_features != dim:
        raise ValueError(f"the camera MLP is {query.camera.proj.out_features} wide but the model is {dim} wide")
