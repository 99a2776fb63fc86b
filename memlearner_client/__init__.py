"""Headless client for a ComfyUI server running the MemLearner workflows (no ComfyUI or torch needed)."""
