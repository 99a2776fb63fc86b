"""Start and drive a real ComfyUI with this pack: the main job (``demo``), the benchmarks and the tests use it.

Never imports from ``tests/``; ComfyUI itself is imported only inside the functions that need it.
"""
