"""Training clips from a folder of captioned videos, encoded once to Wan2.1 VAE latents and cached on disk, or from
a folder of latents encoded beforehand (``read_latent_folder``).

The folder is a memory bank's (``captions.json`` or ``<video>.txt``), plus an optional ``<stem>.poses.json``
per video: a JSON list of 3x4 camera-to-world matrices, one per video frame. Decoding and the VAE belong to
the host (ComfyUI's video reader and VAE), so they come in as functions; this module picks a clip's frames
(spread evenly over the video, as reference videos are), brings them to the training size (resize to cover,
centre crop), and keeps one bad file from ending a run: a video that cannot be decoded or is too short is
skipped, logged and counted, and so is a "video" that is no regular file (a FIFO, a device, a link to
``/dev/null``: never opened, so it cannot block). A wrong poses file is an error naming it, and so is one that
is no regular file: a run trained on misread cameras is worse than no run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..bounded_text import cut, shown_path
from ..confined_files import open_regular, read_confined
from ..memory_bank import latent_cache_path, read_captioned_folder
from ..reference_video import sample_indices
from ..trajectory import TrajectoryError, parse_trajectory, validate_poses

POSES_SUFFIX = ".poses.json"
POSES_LIMIT = 64 * 2**20  # a poses file is ~140 bytes a frame: 64 MB is hours of video
RESIZE_CHUNK = 16  # frames resized at once
log = logging.getLogger("memlearner")


class DatasetError(ValueError):
    """Training data that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class ClipEntry:
    """A captioned training video; ``poses [F, 3, 4]`` one camera-to-world pose per video frame, or None."""

    path: Path
    caption: str
    poses: torch.Tensor | None = None

    @property
    def poses_file(self) -> Path:
        return self.path.with_suffix(POSES_SUFFIX)


def not_regular(path: str | Path) -> str:
    """Why ``path`` is no regular file to read (links followed), or "" when it is one. Nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a loop of symbolic links" if e.errno == errno.ELOOP else f"unreadable ({e.strerror})"
    return "" if stat.S_ISREG(mode) else "not a regular file (a FIFO, device, folder or a link to one)"


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, opened without blocking and checked on the descriptor to be a regular file of at
    most ``limit`` bytes (a FIFO swapped in after a check is refused, never waited on); ``OSError`` otherwise."""
    with os.fdopen(open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, more than a poses file holds ({limit})")
        return f.read(limit + 1)


def load_poses(path: str | Path) -> torch.Tensor:
    """Poses ``[F, 3, 4]`` float32 from a JSON list of 3x4 matrices (any form ``parse_trajectory`` reads),
    validated (finite, orthonormal rotations); any problem is a ``DatasetError`` naming the file (one that is no
    regular file too: it is never opened to block)."""
    path = Path(path)
    fix = "give a JSON list of 3x4 camera-to-world matrices, one per video frame, or remove the file"
    why = not_regular(path)
    if why:
        raise DatasetError(f"poses file {shown_path(path)} is {why}; {fix}")
    try:
        return parse_trajectory(read_regular(path, POSES_LIMIT).decode("utf-8"))
    except (TrajectoryError, UnicodeDecodeError, RecursionError) as e:
        raise DatasetError(f"poses file {shown_path(path)}: {cut(e)}") from None
    except OSError as e:
        raise DatasetError(f"poses file {shown_path(path)}: {e.strerror}; {fix}") from None


def latent_poses(poses: torch.Tensor) -> torch.Tensor:
    """Per-video-frame poses ``[4k+1, 3, 4]`` -> one per latent frame ``[k+1, 3, 4]``: latent frame ``i`` is
    video frames ``4i-3 .. 4i`` in Wan2.1's VAE (frame 0 alone for ``i = 0``), represented by frame ``4i``."""
    return poses[::4]


def resize_and_crop(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Frames ``[F, H, W, 3]`` (0..1, or uint8 0..255) scaled to cover ``height x width`` keeping the aspect
    ratio, then centre-cropped: ``[F, height, width, 3]`` float32."""
    x = frames.float() / 255 if not frames.is_floating_point() else frames.float()
    h, w = x.shape[1:3]
    scale = max(width / w, height / h)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = x.permute(0, 3, 1, 2)
    if size != (h, w):
        x = torch.cat([F.interpolate(c, size=size, mode="bilinear", align_corners=False, antialias=True)
                       for c in x.split(RESIZE_CHUNK)])
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].permute(0, 2, 3, 1).clamp(0, 1).contiguous()


class ClipFolder:
    """The captioned videos of ``folder`` (sorted by name) as training clips of ``clip_frames`` frames at
    ``width x height``; every poses file is read and checked here, before any encoding."""

    def __init__(self, folder: str | Path, clip_frames: int, width: int, height: int):
        if clip_frames < 5 or clip_frames % 4 != 1:
            raise DatasetError(f"clip_frames must be 4k+1 with k >= 1 (Wan2.1's VAE), got {clip_frames}")
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise DatasetError(f"width and height must be positive multiples of 8, got {width}x{height}")
        self.folder, self.clip_frames, self.width, self.height = Path(folder), clip_frames, width, height
        self.entries, self.skipped = [], []  # skipped: (path, why), videos that are no regular file
        for e in read_captioned_folder(folder):
            why = not_regular(e.path)
            if why:
                log.warning("training data: skipped %s: %s", e.path.name, why)
                self.skipped.append((e.path, why))
                continue
            side = e.path.with_suffix(POSES_SUFFIX)
            self.entries.append(ClipEntry(e.path, e.caption, load_poses(side) if os.path.lexists(side) else None))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i: int) -> ClipEntry:
        return self.entries[i]

    def settings_key(self, vae_id: str = "") -> str:
        """What a cached latent depends on besides the file: clip length, size, and the VAE (``vae_id``)."""
        return f"train|{self.clip_frames}f|{self.width}x{self.height}|{vae_id}"

    def clip_indices(self, n_frames: int) -> torch.Tensor:
        """``[clip_frames]`` indices spread evenly over a video of ``n_frames`` (first and last kept)."""
        return sample_indices(n_frames, self.clip_frames)

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """Decoded frames ``[F, H, W, 3]`` -> the clip ``[clip_frames, height, width, 3]`` the VAE encodes."""
        return resize_and_crop(frames[self.clip_indices(frames.shape[0])], self.width, self.height)

    def clip_poses(self, entry: ClipEntry, n_frames: int) -> torch.Tensor | None:
        """The poses of the clip's latent frames ``[T, 3, 4]``, or None for a video without a poses file."""
        if entry.poses is None:
            return None
        if entry.poses.shape[0] != n_frames:
            raise DatasetError(f"poses file {entry.poses_file}: {entry.poses.shape[0]} poses, but the video "
                               f"has {n_frames} frames; give one pose per video frame")
        return latent_poses(entry.poses[self.clip_indices(n_frames)])


class LatentCache:
    """Encoded clips as safetensors files in ``cache_dir``, keyed like the memory bank's cache (the video's
    resolved path, size, modification time, and the settings), so an edited video is encoded again."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def path(self, video: str | Path, settings: str) -> Path:
        return self.dir / latent_cache_path(Path(video), settings).name

    def read(self, video: str | Path, settings: str) -> tuple[torch.Tensor, dict[str, str]] | None:
        """The cached latent and its metadata, or None (not cached, or an unreadable file: logged)."""
        path = self.path(video, settings)
        if not path.is_file():
            return None
        try:  # exactly the file checked to be a regular file inside the cache folder, never a link out of it
            data = read_confined(path, self.dir, "latent cache entry")
            return safetensors.torch.load(data)["latent"], safetensors_metadata(data)
        except Exception as e:  # a truncated, garbled or linked-out cache file is a miss, not a failure
            log.warning("latent cache: %s is unreadable (%s); encoding again", path, e)
            return None

    def get(self, video: str | Path, settings: str) -> torch.Tensor | None:
        hit = self.read(video, settings)
        return None if hit is None else hit[0]

    def put(self, video: str | Path, settings: str, latent: torch.Tensor,
            meta: dict[str, str] | None = None) -> Path:
        """Store ``latent`` atomically (temp file, then rename): a crash never leaves a half-written entry."""
        path = self.path(video, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_atomically(path, {"latent": latent.detach().cpu().contiguous()},
                               {"settings": settings, **(meta or {})})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte little-endian header length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def save_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The safetensors bytes written to a new temporary file beside ``path`` (created exclusively, so a link
    planted under its name is never written through), then renamed over ``path``: a crash never leaves a
    half-written file, and a link at ``path`` is replaced, not followed."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a cache or export file from the user's other tools
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _decode(clips: ClipFolder, decode_fn, path: Path) -> tuple[torch.Tensor | None, str]:
    """Decoded frames ``[F, H, W, 3]``, or None and why the video is skipped."""
    why = not_regular(path)  # again: the listing was a while ago, and a reader would block on a FIFO
    if why:
        return None, why
    try:
        frames = decode_fn(path)
    except Exception as e:  # any reader failure (corrupt file, unknown codec) skips the video
        return None, f"could not be decoded ({type(e).__name__}: {e})"
    if frames is None or not isinstance(frames, torch.Tensor) or frames.numel() == 0:
        return None, "empty (no frames)"
    if frames.ndim != 4 or frames.shape[-1] != 3:
        return None, f"decoded to {tuple(frames.shape)}, not frames [F, H, W, 3]"
    if frames.shape[0] < clips.clip_frames:
        return None, f"{frames.shape[0]} frames, fewer than the {clips.clip_frames} of a clip"
    return frames, ""


def encode_all(clips: ClipFolder, decode_fn: Callable[[Path], torch.Tensor],
               encode_fn: Callable[[torch.Tensor], torch.Tensor], cache: LatentCache | None = None,
               vae_id: str = "") -> tuple[list[tuple[ClipEntry, torch.Tensor, torch.Tensor | None]],
                                          list[tuple[Path, str]]]:
    """Encode every clip of ``clips``, from the cache where it has it.

    ``decode_fn(path) -> frames [F, H, W, 3]`` and ``encode_fn(clip [clip_frames, height, width, 3]) ->
    latent [16, T, H/8, W/8]`` (or ``[1, 16, T, H/8, W/8]``) come from the host; ``vae_id`` names the VAE in
    the cache key. Returns ``[(entry, latent [16, T, h, w], poses [T, 3, 4] or None)]`` and the skipped
    ``[(path, why)]``: videos that fail to decode, are empty, or are shorter than a clip are logged and
    skipped, never raised.
    """
    settings, items, skipped = clips.settings_key(vae_id), [], list(getattr(clips, "skipped", []))
    for entry in clips:
        hit = cache.read(entry.path, settings) if cache is not None else None
        if hit is not None:
            latent, poses = hit[0], clips.clip_poses(entry, int(hit[1].get("frames", "-1")))
        else:
            frames, why = _decode(clips, decode_fn, entry.path)
            if frames is None:
                log.warning("training data: skipped %s: %s", entry.path.name, why)
                skipped.append((entry.path, why))
                continue
            n_frames = frames.shape[0]
            poses = clips.clip_poses(entry, n_frames)  # checked before the costly encode
            latent = encode_fn(clips.prepare(frames))
            latent = latent[0] if latent.ndim == 5 and latent.shape[0] == 1 else latent
            if latent.ndim != 4:
                raise DatasetError(f"encode_fn must return a video latent [C, T, H, W], got "
                                   f"{tuple(latent.shape)} for {entry.path.name}")
            if cache is not None:
                cache.put(entry.path, settings, latent, {"frames": str(n_frames)})
        items.append((entry, latent, poses))
    if skipped:
        log.warning("training data %s: %d of %d video(s) skipped", clips.folder, len(skipped),
                    len(clips) + len(getattr(clips, "skipped", [])))
    return items, skipped


LATENT_SUFFIX = ".safetensors"


def _latent_clip(path: Path, latent_frames: int, hw: tuple[int, int],
                 channels: int = 16) -> tuple[torch.Tensor | None, str, dict]:
    """A pre-encoded clip's first ``latent_frames`` frames ``[channels, T, h, w]``, or None and why it is
    skipped."""
    why = not_regular(path)  # safetensors would block opening a FIFO
    if why:
        return None, why, {}
    try:
        with safe_open(str(path), "pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            if "latent" not in names:
                return None, f"has no 'latent' tensor (found {sorted(names)})", {}
            latent = f.get_tensor("latent")
            poses = f.get_tensor("poses") if "poses" in names else None
    except Exception as e:  # not a safetensors file, truncated, ...
        return None, f"could not be read ({type(e).__name__}: {e})", {}
    if latent.ndim == 5 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 4 or latent.shape[0] != channels:
        return None, f"latent is {tuple(latent.shape)}, not a video latent [{channels}, T, H, W] of the model's VAE", {}
    if not latent.is_floating_point() or not torch.isfinite(latent).all():
        return None, "latent is not finite floating-point numbers", {}
    if tuple(latent.shape[2:]) != hw:
        return None, f"latent frames are {tuple(latent.shape[2:])}, the config's width and height make {hw}", {}
    if latent.shape[1] < latent_frames:
        return None, f"{latent.shape[1]} latent frames, fewer than the {latent_frames} of a clip", {}
    return latent[:, :latent_frames].float(), "", {"meta": meta, "poses": poses}


def read_latent_folder(folder: str | Path, latent_frames: int, width: int, height: int, channels: int = 16,
                       vae_stride: int = 8
                       ) -> tuple[list[tuple[ClipEntry, torch.Tensor, torch.Tensor | None]], list[tuple[Path, str]]]:
    """Clips already encoded: every ``<clip>.safetensors`` of ``folder`` (sorted by name) holding ``latent
    [channels, T, H, W]`` (LATENT samples, as VAE Encode gives them, ``H, W = height, width / vae_stride``: Wan2.1
    16 channels and 8, Wan2.2 TI2V-5B 48 and 16), optionally ``poses
    [T, 3, 4]`` (one camera-to-world pose per latent frame) and a ``caption`` metadata entry. The first
    ``latent_frames`` frames are the clip. Returns what ``encode_all`` returns: unreadable or unfit files are
    logged and skipped; poses that do not fit the latent are an error naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training data folder not found: {folder}")
    items, skipped = [], []
    for path in sorted(folder.glob("*" + LATENT_SUFFIX)):
        latent, why, extra = _latent_clip(path, latent_frames, (height // vae_stride, width // vae_stride), channels)
        if latent is None:
            log.warning("training data: skipped %s: %s", path.name, why)
            skipped.append((path, why))
            continue
        poses = extra["poses"]
        if poses is not None:
            if poses.ndim != 3 or poses.shape[0] < latent_frames:
                raise DatasetError(f"{path}: poses must be [T, 3, 4] with one pose per latent frame "
                                   f"(at least {latent_frames}), got {tuple(poses.shape)}")
            try:
                poses = validate_poses(poses[:latent_frames].float(), f"poses of {path.name}")
            except TrajectoryError as e:
                raise DatasetError(f"{path}: {e}") from None
        items.append((ClipEntry(path, extra["meta"].get("caption", ""), poses), latent, poses))
    if skipped:
        log.warning("training data %s: %d of %d latent file(s) skipped", folder, len(skipped),
                    len(skipped) + len(items))
    return items, skipped


def write_latent_clip(path: str | Path, latent: torch.Tensor, poses: torch.Tensor | None = None,
                      caption: str = "") -> Path:
    """Store a pre-encoded clip the way ``read_latent_folder`` reads it (atomically: temp file, then rename)."""
    path = Path(path)
    tensors = {"latent": latent.detach().float().cpu().contiguous()}
    if poses is not None:
        tensors["poses"] = poses.detach().float().cpu().contiguous()
    return save_atomically(path, tensors, {"caption": caption})
