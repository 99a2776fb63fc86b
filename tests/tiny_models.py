"""The tiny Wan2.1-shaped fixtures, which live in ``memlearner_host.tiny_models`` (the demo uses them too)."""

from memlearner_host.tiny_models import *  # noqa: F403
