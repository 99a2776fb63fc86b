"""Host-free groundwork for training both memories: settings, the flow-matching target, context sampling,
the clip dataset with its latent cache, and resumable checkpoints.

Everything here is plain torch; what only the host has (the video reader, the VAE, the Wan model) comes in as
functions or modules from the caller, so each piece can be tested without ComfyUI.
"""
