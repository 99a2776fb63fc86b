"""``memlearner-train``: train the pack's memories on your own videos, on ComfyUI's own Wan2.1 model."""
