"""Rollout scheduling: a long video as chunks, each conditioned on a context chosen from everything before it.

A ``RolloutPlan`` says what to generate (chunk size, how many chunks, the camera) and how each chunk's context is
picked; it is checked when made, and ``check_settings`` runs the same checks on the settings known before a run.
The memory bank holds the clean latent frames ``[C, N, H, W]`` of all chunks so far (and their camera poses).
Before each chunk a policy (``context_policy``) picks frames and their pooling; the bank turns the picks into the
chunk's ``ContextSpec``, frames at their true offset before the chunk (negative frame indices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .context_policy import POLICIES, FramePick, frame_cost
from .context_tokens import ContextSegment, ContextSpec

MAX_QUERY_LAYERS, MAX_QUERY_POOL = 64, 8


class RolloutError(ValueError):
    """Rollout settings that cannot run; the message says which setting to change."""


def latent_frames(pixel_frames: int) -> int:
    """Wan2.1's VAE maps ``4k+1`` video frames to ``k+1`` latent frames."""
    if pixel_frames < 1 or (pixel_frames - 1) % 4:
        raise ValueError(f"chunk length must be 4k+1 video frames (5, 9, ..., 81), got {pixel_frames}")
    return (pixel_frames - 1) // 4 + 1


def _whole(value, what: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise RolloutError(f"{what} must be a whole number {bounds}, got {value!r}")


def check_settings(*, chunks: int | None = None, policy: str | None = None, context_frames: int | None = None,
                   query_layers: int | None = None, query_pool: int | None = None,
                   has_camera: bool | None = None) -> None:
    """Raise ``RolloutError`` for settings no rollout can run with. ``None`` is a setting not known yet (an input
    linked from another node, checked when the run starts) and is skipped, alone and in the checks it takes part in.
    """
    for value, what, low, high in ((chunks, "chunks", 1, None), (context_frames, "context_frames", 0, None),
                                   (query_layers, "query_layers", 0, MAX_QUERY_LAYERS),
                                   (query_pool, "query_pool", 1, MAX_QUERY_POOL)):
        if value is not None:
            _whole(value, what, low, high)
    if policy is not None and policy not in POLICIES:
        raise RolloutError(f"unknown policy {policy!r}; the policies are: {', '.join(POLICIES)}")
    if query_layers == 0 or policy is None:
        return
    if policy == "fov" and has_camera is False:
        raise RolloutError("the fov policy picks frames by camera view: choose a camera trajectory "
                           "(connect a Camera Path), or another policy")
    if policy != "all" and context_frames == 0:
        raise RolloutError(f"the {policy} policy needs a budget: set context_frames above 0 "
                           "(0 = unlimited is for 'all')")


def check_switch_step(switch_step: int | None, steps: int | None, two_experts: bool | None) -> None:
    """``switch_step`` hands sampling from the first expert to the second (Wan2.2 A14B: high noise, then low
    noise): 0 with one model, 1 .. ``steps`` - 1 with two. ``None`` is not known yet, and skipped."""
    if switch_step is None:
        return
    _whole(switch_step, "switch_step", 0)
    if two_experts is False and switch_step:
        raise RolloutError(f"switch_step is {switch_step} but no guider_low is connected: connect the low-noise "
                           "expert's guider, or set switch_step to 0 (one model for every step)")
    if two_experts and switch_step == 0:
        raise RolloutError("guider_low is connected but switch_step is 0: set switch_step to the step at which the "
                           "low-noise expert takes over (ComfyUI's Wan2.2 A14B template: 10 of 20 steps)")
    if two_experts and steps is not None and switch_step >= steps:
        raise RolloutError(f"switch_step must be from 1 to {steps - 1} for the sigmas' {steps} steps, got "
                           f"{switch_step}: both experts need at least one step")


def split_steps(sigmas: torch.Tensor, switch_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigmas`` ``[steps + 1]`` as the two experts' passes (as ComfyUI's SplitSigmas): ``[: switch_step + 1]``
    and ``[switch_step:]``, the second starting where the first stops."""
    return sigmas[:switch_step + 1], sigmas[switch_step:]


@dataclass(frozen=True)
class RolloutPlan:
    """A whole rollout: ``chunks`` chunks of ``chunk_shape`` (latent frames, height, width) after
    ``first_frames`` given frames, each chunk's context picked by ``policy`` within ``context_frames``
    full-resolution latent frames of tokens (0 = no cap) and read through ``query_layers`` query layers
    (0 = chunks do not see each other). ``poses``: one camera pose per latent frame of the whole video, or None.
    """

    chunk_shape: tuple[int, int, int]
    chunks: int
    policy: str = "all"
    context_frames: int = 0
    query_layers: int = 5
    query_pool: int = 1
    first_frames: int = 0
    poses: torch.Tensor | None = None

    def __post_init__(self):
        check_settings(chunks=self.chunks, policy=self.policy, context_frames=self.context_frames,
                       query_layers=self.query_layers, query_pool=self.query_pool, has_camera=self.poses is not None)
        _whole(self.first_frames, "first_frames", 0)
        if self.poses is not None and self.poses.shape[0] < self.total_frames:
            raise RolloutError(f"the camera path has {self.poses.shape[0]} poses but the video needs "
                               f"{self.total_frames} latent frames")

    @property
    def total_frames(self) -> int:
        """Latent frames of the whole video: the first frames, then every chunk."""
        return self.first_frames + self.chunks * self.chunk_shape[0]

    @property
    def budget(self) -> int | None:
        """The context budget in tokens; None = no cap."""
        _, h, w = self.chunk_shape
        return None if self.context_frames == 0 else self.context_frames * frame_cost(h, w)

    def chunk_index(self, first_frame: int) -> int:
        """The chunk that starts at latent frame ``first_frame``, counted from frame 0 (given frames included), so
        a rollout continued from its own first chunks numbers (and seeds) its chunks as the longer run did."""
        return first_frame // self.chunk_shape[0]


class MemoryBank:
    """Every latent frame generated so far, ``[C, N, H, W]``, with per-frame poses ``[N, 3, 4]`` (or None)."""

    def __init__(self, poses: torch.Tensor | None = None):
        self.frames: torch.Tensor | None = None
        self.all_poses = poses  # the whole trajectory: frame i's pose is all_poses[i]

    @property
    def n_frames(self) -> int:
        return 0 if self.frames is None else self.frames.shape[1]

    def poses(self, start: int, stop: int) -> torch.Tensor | None:
        return None if self.all_poses is None else self.all_poses[start:stop]

    def append(self, chunk: torch.Tensor) -> None:
        """Add a chunk's clean latent ``[C, T, H, W]``."""
        chunk = chunk.detach().cpu()
        self.frames = chunk if self.frames is None else torch.cat([self.frames, chunk], 1)

    def context(self, picks: list[FramePick], chunk_start: int) -> ContextSpec:
        """Picked frames as segments (runs of consecutive frames with the same pooling), indices relative to
        the chunk starting at ``chunk_start``."""
        segments, run = [], []
        for p in sorted(picks, key=lambda p: p.index):
            if run and (p.pool != run[-1].pool or p.index != run[-1].index + 1):
                segments.append(self._segment(run, chunk_start))
                run = []
            run.append(p)
        if run:
            segments.append(self._segment(run, chunk_start))
        return ContextSpec(segments)

    def _segment(self, run: list[FramePick], chunk_start: int) -> ContextSegment:
        idx = torch.tensor([p.index for p in run])
        poses = None if self.all_poses is None else self.all_poses[idx]
        return ContextSegment(self.frames[:, idx], idx - chunk_start, run[0].pool, poses)


@dataclass
class ChunkRecord:
    """What one chunk of a rollout used and cost; the node reports these as JSON."""

    chunk: int
    first_frame: int  # absolute latent-frame index of the chunk's first frame
    context: list[list[int]] = field(default_factory=list)  # [[frame index, pool], ...]
    context_tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # "cuda_allocated" (this chunk) or "process_peak_rss" (the process so far, on CPU)
    routed: dict[str, list[int]] | None = None  # learned policy: query layer -> the frame indices it read
    routed_low: dict[str, list[int]] | None = None  # the same for the second expert (Wan2.2 A14B), if any

    def as_dict(self) -> dict:
        return asdict(self)

    def routed_to(self, routed: dict[int, list[int]], candidates: list[FramePick], hw: tuple[int, int],
                  routed_low: dict[int, list[int]] | None = None) -> None:
        """The learned policy's reads (``routed``, and the second expert's ``routed_low``: layer -> positions in
        ``candidates``): ``context`` becomes the frames any query layer of either read and ``context_tokens`` the
        tokens one layer reads."""
        def indices(layers):
            return {str(layer): [candidates[i].index for i in frames] for layer, frames in sorted(layers.items())}

        self.routed = indices(routed)
        self.routed_low = None if routed_low is None else indices(routed_low)
        every = [*self.routed.values(), *(self.routed_low or {}).values()]
        self.context = [[i, 1] for i in sorted({i for frames in every for i in frames})]
        self.context_tokens = max((len(f) for f in every), default=0) * frame_cost(*hw)


def context_tokens(picks: list[FramePick], hw: tuple[int, int]) -> int:
    return sum(frame_cost(hw[0], hw[1], p.pool) for p in picks)
