"""Checkpoint I/O: safetensors only, with errors that name the problem.

Pickled checkpoints (``.pt``, ``.ckpt``, ``.pth``, ``.bin``) can run code when loaded and are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .bounded_text import bounded, listed, shown
from .camera import CameraEmbedding
from .memory_encoder import KNOWN_LATENT_SHAPES, EncoderConfig, MemoryEncoder, cnn_output_shape
from .model_family import DEFAULT_FAMILY, FAMILIES

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}
ENCODER_PREFIXES = ("pipe.dit_mem.", "dit_mem.")
CONVERT_HINT = (
    "Convert it once in a trusted Python session: "
    "`import torch; from safetensors.torch import save_file; "
    "sd = torch.load('in.pt', map_location='cpu', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'out.safetensors')`."
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as it is; the message says why and what to do, ``bounded``."""

    def __init__(self, message: str):
        super().__init__(bounded(str(message)))


def looks_pickled(path: Path) -> bool:
    """A pickle's magic at the file's start: a zip archive (``torch.save``) or pickle protocol 2-5."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else is a ``CheckpointError``. The safetensors parser
    decides what is a safetensors file; a file it refuses is named a pickle when its suffix or its first bytes
    say so. Nothing is ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        if path.suffix.lower() in PICKLE_SUFFIXES or looks_pickled(path):
            raise CheckpointError(f"{path.name}: this is a pickled torch checkpoint, not safetensors; pickled "
                                  f"checkpoints are not loaded (they can run code). {CONVERT_HINT}") from None
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e}); the file may be corrupt or truncated") from e
    return tensors, meta


def check_weights(sd: dict[str, torch.Tensor], name: str, integer_ok: tuple[str, ...] = ()) -> None:
    """Refuse weights that are not floating point (integer or bool tensors are not silently converted) or not
    finite (NaN or infinity would be reported as a result). Keys ending in ``integer_ok`` may be integers."""
    for key, t in sd.items():
        if key.endswith(integer_ok) and not t.is_floating_point() and t.dtype != torch.bool:
            continue
        if not t.is_floating_point():
            raise CheckpointError(f"{name}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, not floating "
                                  "point; save the weights as float32, float16 or bfloat16")
        if not torch.isfinite(t.float()).all():
            raise CheckpointError(f"{name}: tensor {key} has NaN or infinite values; the file is damaged or the "
                                  "training diverged")


def strip_encoder_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _meta_value(meta: dict[str, str], name: str, default, file: str):
    raw = meta.get(f"memlearner.encoder.{name}")
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{file}: metadata memlearner.encoder.{name} is not valid JSON: {shown(raw, 60)}") from None
    return tuple(value) if isinstance(value, list) else value


def _whole(value, file: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{file}: metadata memlearner.encoder.{name} must be a whole number >= 1, "
                              f"got {shown(value)}")
    return value


def infer_encoder_config(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None,
                         file: str = "the encoder file") -> EncoderConfig:
    """Read the architecture from the weights (widths, kernel, CNN spatial size) and this pack's metadata."""
    meta = meta or {}
    needed = {"high_pass_module.conv_block1.conv.weight": 5, "high_pass_module.conv_block2.conv.weight": 5,
              "high_pass_module.feature_proj.weight": 2}
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(
            f"not a DiT-Mem memory encoder: missing {', '.join(missing)} "
            f"(expected keys like 'high_pass_module.conv_block1.conv.weight', optionally prefixed by "
            f"{' or '.join(repr(p) for p in ENCODER_PREFIXES)})")
    for key, ndim in needed.items():
        if sd[key].ndim != ndim or 0 in sd[key].shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(sd[key].shape)}, expected {ndim} non-empty "
                                  "dimensions")
    w1 = sd["high_pass_module.conv_block1.conv.weight"]
    w2 = sd["high_pass_module.conv_block2.conv.weight"]
    proj = sd["high_pass_module.feature_proj.weight"]
    c1, c2 = w1.shape[0], w2.shape[0]
    if proj.shape[1] % c2:
        raise CheckpointError(f"feature_proj input width {proj.shape[1]} is not a multiple of the CNN width {c2}")
    hw = proj.shape[1] // c2
    latent_shape = _meta_value(meta, "latent_shape", KNOWN_LATENT_SHAPES.get(hw), file)
    if latent_shape is None:
        raise CheckpointError(
            f"cannot tell the latent shape this encoder expects (feature_proj implies a CNN output of {hw} "
            f"positions, not a released config); save it with metadata 'memlearner.encoder.latent_shape'")
    if not isinstance(latent_shape, tuple) or len(latent_shape) != 3:
        raise CheckpointError(f"{file}: metadata memlearner.encoder.latent_shape must be [T, H, W], "
                              f"got {shown(latent_shape)}")
    latent_shape = tuple(_whole(n, file, "latent_shape") for n in latent_shape)
    tokens = _whole(_meta_value(meta, "tokens_per_video", 100, file), file, "tokens_per_video")
    heads = _whole(_meta_value(meta, "heads", 8, file), file, "heads")
    cfg = EncoderConfig(
        in_channels=w1.shape[1], hidden_channels=(c1, c2), first_kernel=w1.shape[2], width=proj.shape[0],
        tokens_per_video=tokens, heads=heads, latent_shape=latent_shape)
    if 0 in cnn_output_shape(cfg):
        raise CheckpointError(f"{file}: metadata memlearner.encoder.latent_shape {list(latent_shape)} is too small "
                              f"for the encoder's convolutions (no output left after them)")
    if cfg.width % cfg.heads:
        raise CheckpointError(f"{file}: encoder width {cfg.width} is not divisible by {cfg.heads} heads "
                              "(metadata memlearner.encoder.heads)")
    return cfg


def load_memory_encoder(path: str | os.PathLike) -> MemoryEncoder:
    """Build a ``MemoryEncoder`` from a safetensors file (official or this pack's layout), in eval mode.

    Every parameter must be present with the right shape and nothing unexpected may remain; BatchNorm
    running statistics are optional (the released file has none: eval mode then uses mean 0, variance 1).
    """
    sd, meta = read_safetensors(path)
    sd = strip_encoder_prefix(sd)
    cfg = infer_encoder_config(sd, meta, Path(path).name)
    with torch.device("meta"):
        enc = MemoryEncoder(cfg)
    params = dict(enc.named_parameters())
    buffers = dict(enc.named_buffers())
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params) - set(buffers))
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(p.shape)}"
                   for k, p in {**params, **buffers}.items() if k in sd and tuple(sd[k].shape) != tuple(p.shape))
    problems = []
    if missing:
        problems.append(f"missing parameters: {listed(missing, quote=False)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listed(unexpected, quote=False)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:4])}")
    if problems:
        raise CheckpointError(f"{Path(path).name} does not match the DiT-Mem encoder ({cfg}): " + " | ".join(problems))
    check_weights(sd, Path(path).name, integer_ok=("num_batches_tracked",))
    enc = MemoryEncoder(cfg)
    enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return enc.eval().requires_grad_(False)


def save_memory_encoder(enc: MemoryEncoder, path: str | os.PathLike, prefix: str = "") -> None:
    """Write parameters and BatchNorm statistics, plus the config as metadata."""
    sd = {prefix + k: v.detach().contiguous().cpu() for k, v in enc.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    save_file(sd, str(path), metadata=enc.cfg.to_metadata())


# --- Query-memory weights -------------------------------------------------------------------------------------
# A MemLearner-fine-tuned Wan is an ordinary Wan state dict (loaded by ComfyUI's UNETLoader) plus this file,
# which holds the pack's own tensors.
#   metadata  memlearner.format = "query-memory", memlearner.version = "2",
#             memlearner.query_layers = "<K the model was fine-tuned with>",
#             memlearner.query_pool = "<query pool it was fine-tuned with>"  (version 2)
#             memlearner.model_family = "wan2.1" or "wan2.2-ti2v-5b"  (any version; absent: "wan2.1")
#   tensors   camera.proj.weight [dim, 12], camera.proj.bias [dim]
# Version 1 (camera MLP on the history C and the predicted tokens P) still loads; version 2 also adds it to the
# query tokens Q, as the published method does; version 3 is version 2 with view-aligned RoPE
# (``memlearner.view_rope_fov``, degrees), written only for weights trained with it, so older packs refuse those
# instead of running them with the wrong positions.
QUERY_FORMAT = "query-memory"
QUERY_VERSIONS = {"1", "2", "3"}
QUERY_VERSION = "2"
VIEW_ROPE_VERSION = "3"


@dataclass(frozen=True)
class QueryWeights:
    """A query-weights file: the camera MLP's state dict and what the model was fine-tuned with."""

    camera: dict[str, torch.Tensor]
    query_layers: int
    query_pool: int | None  # None: not recorded (version 1)
    camera_on_query: bool
    view_rope_fov: float | None = None  # degrees; None: stock positions (versions 1 and 2)
    model_family: str = DEFAULT_FAMILY  # the Wan family fine-tuned (``model_family.FAMILIES``)

    def mismatch(self, query_layers: int | None, query_pool: int | None,
                 model_family: str | None = None) -> tuple[str, int | str, int | str] | None:
        """The first of ``model_family``, ``query_layers``, ``query_pool`` (None: not checked) that differs from
        what these weights were fine-tuned with, as ``(key, recorded, given)``; None when they agree. Version 1
        records no pool."""
        checks = (("model_family", model_family), ("query_layers", query_layers), ("query_pool", query_pool))
        for key, given in checks:
            recorded = getattr(self, key)
            if given is not None and recorded is not None and recorded != given:
                return key, recorded, given
        return None

    def camera_embedding(self) -> CameraEmbedding:
        """The camera MLP these weights hold (on the CPU)."""
        camera = CameraEmbedding(self.camera["proj.weight"].shape[0], on_query=self.camera_on_query,
                                 view_rope_fov=self.view_rope_fov)
        camera.load_state_dict(self.camera)
        return camera


def save_query_weights(path, camera_state: dict[str, torch.Tensor], query_layers: int, query_pool: int = 1,
                       view_rope_fov: float | None = None, model_family: str = DEFAULT_FAMILY) -> None:
    sd = {f"camera.{k}": v.detach().contiguous().cpu() for k, v in camera_state.items()}
    meta = {"memlearner.format": QUERY_FORMAT, "memlearner.version": QUERY_VERSION,
            "memlearner.query_layers": str(query_layers), "memlearner.query_pool": str(query_pool),
            "memlearner.model_family": model_family}
    if view_rope_fov is not None:
        meta |= {"memlearner.version": VIEW_ROPE_VERSION, "memlearner.view_rope_fov": repr(float(view_rope_fov))}
    save_file(sd, str(path), metadata=meta)


def load_query_weights(path) -> QueryWeights:
    """Read and check a query-weights file (either version)."""
    sd, meta = read_safetensors(path)
    name = Path(path).name
    fmt, version = meta.get("memlearner.format"), meta.get("memlearner.version")
    if fmt != QUERY_FORMAT:
        raise CheckpointError(f"{name}: not a query-memory weights file (format {shown(fmt)}, expected {QUERY_FORMAT!r})")
    if version not in QUERY_VERSIONS:
        raise CheckpointError(f"{name}: query-memory weights version {shown(version)} is not supported "
                              f"(this pack reads versions {sorted(QUERY_VERSIONS)}); update the pack")
    camera = {k[len("camera."):]: v for k, v in sd.items() if k.startswith("camera.")}
    if set(camera) != {"proj.weight", "proj.bias"}:
        raise CheckpointError(f"{name}: expected camera.proj.weight and camera.proj.bias, found {listed(sorted(sd), quote=False)}")
    weight, bias = camera["proj.weight"], camera["proj.bias"]
    if weight.ndim != 2 or weight.shape[1] != 12 or tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"{name}: camera.proj.weight must be [dim, 12] and camera.proj.bias [dim], got "
                              f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    check_weights(sd, name)
    numbers = {}
    for key, default in (("query_layers", "5"), ("query_pool", None)):
        raw = meta.get(f"memlearner.{key}", default)
        if raw is not None and not (raw.isascii() and raw.isdigit() and int(raw) >= 1):
            raise CheckpointError(f"{name}: metadata memlearner.{key} must be a whole number >= 1, got {shown(raw)}")
        numbers[key] = None if raw is None else int(raw)
    family = meta.get("memlearner.model_family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise CheckpointError(f"{name}: metadata memlearner.model_family {shown(family)} is not a model family this "
                              f"pack knows ({', '.join(FAMILIES)}); update the pack")
    return QueryWeights(camera, numbers["query_layers"], numbers["query_pool"], camera_on_query=version != "1",
                        view_rope_fov=view_rope_fov(meta, version, name), model_family=family)


def view_rope_fov(meta: dict[str, str], version: str, name: str) -> float | None:
    """Version 3's ``memlearner.view_rope_fov``: degrees in (0, 360], required there and refused elsewhere."""
    raw = meta.get("memlearner.view_rope_fov")
    if version != VIEW_ROPE_VERSION:
        if raw is not None:
            raise CheckpointError(f"{name}: metadata memlearner.view_rope_fov needs query-weights version "
                                  f"{VIEW_ROPE_VERSION}, the file says {shown(version)}")
        return None
    try:
        fov = float(raw)
    except (TypeError, ValueError):
        fov = float("nan")
    if not 0 < fov <= 360:
        raise CheckpointError(f"{name}: metadata memlearner.view_rope_fov must be degrees in (0, 360], got "
                              f"{shown(raw)}")
    return fov
