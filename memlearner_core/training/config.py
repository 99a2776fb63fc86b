"""Training settings: one flat TOML file, checked in full before anything heavy starts.

A training run is long and costly, so a typo must fail at once with the key named, not hours in: unknown keys,
wrong types and out-of-range values are all errors. Relative paths resolve against the TOML file's folder, so
a run folder (settings, data, outputs) can be moved as a whole. Files are not opened here; the trainer checks
that they exist.
"""

from __future__ import annotations

import difflib
import errno
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..bounded_text import QUOTE_LONG, shown, shown_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+, the same parser ships as tomli
    import tomli as tomllib

RECIPES = ("query", "encoder")
PRECISIONS = ("bf16", "fp32")
DATA_FORMATS = ("videos", "latents")
TEXT_SOURCES = ("captions", "none")
CAMERA_INITS = ("zeros", "normal")
CONTEXT_POLICIES = ("all", "recent", "fov", "framepack", "learned")  # as context_policy.POLICIES; the rollout's choices
DEFAULT_CONTEXT_POLICIES = ("all", "recent", "fov", "framepack")
HOSTS = ("comfyui", "diffusers")  # whose Wan2.1 trains: ComfyUI's WanModel or diffusers' WanTransformer3DModel
DEFAULT_LR = {"query": 1e-5, "encoder": 1e-5}
REQUIRED = ("recipe", "data_dir", "output_dir", "model_file")
MINIMUM = {"steps": 1, "batch_size": 1, "weight_decay": 0.0, "checkpoint_every": 1, "keep_checkpoints": 1,
           "seed": 0, "query_layers": 0, "query_pool": 1, "predict_latent_frames": 1, "max_context_multiple": 0,
           "clip_frames": 5, "width": 16, "height": 16, "lora_rank": 0, "top_k_references": 1,
           "warmup_steps": 0, "grad_clip": 0.0, "camera_init_std": 0.0, "reference_pool": 0, "view_rope_fov": 0.0,
           "reference_clip_frames": 0, "reference_width": 0, "reference_height": 0, "encoder_window": 0}
CHOICES = {"recipe": RECIPES, "mixed_precision": PRECISIONS, "data_format": DATA_FORMATS, "text": TEXT_SOURCES,
           "camera_init": CAMERA_INITS, "context_policies": CONTEXT_POLICIES, "host": HOSTS}


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and what it must be."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``recipe`` "query" fine-tunes Wan2.1 with query layers (MemLearner); "encoder"
    trains a DiT-Mem memory encoder against a frozen Wan2.1."""

    recipe: str
    data_dir: Path
    output_dir: Path
    model_file: Path
    vae_file: Path | None = None  # the Wan2.1 VAE; needed for data_format = "videos"
    steps: int = 10_000
    batch_size: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the recipe
    warmup_steps: int = 0  # learning rate rises linearly from 0 over these steps
    grad_clip: float = 0.0  # clip the gradient norm to this (0: no clipping)
    weight_decay: float = 0.01
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    query_layers: int = 5  # 0: no query memory (a plain Wan2.1 trained on the same clips, a baseline)
    query_pool: int = 1  # one query token per query_pool x query_pool cell of the predicted frames (query recipe)
    predict_latent_frames: int = 2  # P, latent frames denoised per clip (query recipe)
    max_context_multiple: int = 9  # context length uniform in 0 .. this x P (query recipe)
    # context picked from the clip's earlier frames by one of these rollout policies per item (query recipe)
    context_policies: tuple[str, ...] = DEFAULT_CONTEXT_POLICIES
    camera_init: str = "zeros"  # camera MLP init: "zeros" (fine-tuning a pretrained Wan) or "normal" (from scratch)
    camera_init_std: float = 0.5  # the normal init's standard deviation
    # query recipe: the clips' horizontal field of view in degrees, to place every frame's tokens by where its camera
    # looks (view-aligned RoPE, memlearner_core/view_rope.py; recorded in the query weights); 0: stock positions
    view_rope_fov: float = 0.0
    clip_frames: int = 81  # video frames per clip, 4k+1
    width: int = 832
    height: int = 480
    lora_rank: int = 0  # 0: full fine-tune
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    device: str = "auto"  # "auto": CUDA when present, else the CPU; or "cpu", "cuda", "cuda:1", ...
    data_format: str = "videos"  # "latents": data_dir holds <clip>.safetensors with `latent` (and `poses`)
    text: str = "captions"  # "none": no text, every clip conditioned on an empty (zero) text embedding
    top_k_references: int = 5  # encoder recipe
    # encoder recipe: 0 = each clip's top_k_references fixed (DiT-Mem); n: each step draws top_k of the n best
    reference_pool: int = 0
    # encoder recipe: the reference videos' size the encoder takes (0: the clips' own clip_frames/width/height)
    reference_clip_frames: int = 0
    reference_width: int = 0
    reference_height: int = 0
    encoder_window: int = 0  # encoder recipe: latent frames denoised per step, a random window (0: the whole clip)
    encoder_file: Path | None = None  # encoder recipe: initial weights, None = random init
    # query recipe: the camera MLP starts from this query-weights file (fine-tuning further); encoder recipe: the
    # frozen model's query weights, so the encoder trains with query memory on, context drawn as the query recipe
    # draws it (for a model run with both memories)
    query_file: Path | None = None
    text_encoder_file: Path | None = None  # umt5 for the captions (ComfyUI's text_encoders file)
    cache_dir: Path | None = None  # None: <output_dir>/latent_cache
    # "diffusers": the model trains as diffusers' WanTransformer3DModel (memlearner_diffusers; pre-encoded clips,
    # model_file a ComfyUI single file or a diffusers folder); the exports are the same files either way
    host: str = "comfyui"

    def __post_init__(self):
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.recipe])
        if self.cache_dir is None:
            object.__setattr__(self, "cache_dir", self.output_dir / "latent_cache")

    @property
    def latent_frames(self) -> int:
        """Latent frames of one clip: Wan2.1's VAE maps ``4k+1`` frames to ``k+1``."""
        return (self.clip_frames - 1) // 4 + 1

    @property
    def reference_latent_shape(self) -> tuple[int, int, int] | None:
        """(T, H, W) of the latents the memory encoder takes, when set apart from the clips'."""
        if not (self.reference_clip_frames or self.reference_width or self.reference_height):
            return None
        return ((self.reference_clip_frames or self.clip_frames) - 1) // 4 + 1, \
            (self.reference_height or self.height) // 8, (self.reference_width or self.width) // 8


KINDS = {f.name: f.type for f in fields(TrainConfig)}


def _check(key: str, value, base: Path):
    kind = KINDS[key]
    if kind.startswith("Path"):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"'{key}' must be a path (a non-empty string), got {shown(value, QUOTE_LONG)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):  # the OS refuses NUL; the rest are typos
            raise ConfigError(f"'{key}' holds a NUL or control character ({shown(value, QUOTE_LONG)}); write the path "
                              "without it")
        try:
            path = Path(value).expanduser()
            return path if path.is_absolute() else (base / path).resolve()
        except RuntimeError:  # Path.resolve's "Symlink loop" (Python < 3.13)
            raise ConfigError(f"'{key}' {shown_path(value)} is a loop of symbolic links; point {key} at the file "
                              "or folder itself") from None
        except OSError as e:
            why = "is a loop of symbolic links" if e.errno == errno.ELOOP else f"cannot be resolved ({e.strerror})"
            raise ConfigError(f"'{key}' {shown_path(value)} {why}; point {key} at the file or folder itself") \
                from None
    if kind.startswith("tuple"):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                or any(v not in CHOICES[key] for v in value):
            raise ConfigError(f"'{key}' must be a non-empty list of {', '.join(repr(c) for c in CHOICES[key])}, "
                              f"got {shown(value, QUOTE_LONG)}")
        return tuple(dict.fromkeys(value))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {shown(value, QUOTE_LONG)}")
        return value
    if kind == "str":
        if key == "device":
            return _device(value)
        if value not in CHOICES[key]:
            raise ConfigError(f"'{key}' must be one of {', '.join(repr(c) for c in CHOICES[key])}, "
                              f"got {shown(value, QUOTE_LONG)}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be a whole number, got {shown(value, QUOTE_LONG)}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {shown(value, QUOTE_LONG)}")
    if key in MINIMUM and value < MINIMUM[key]:
        raise ConfigError(f"'{key}' must be >= {MINIMUM[key]}, got {shown(value, QUOTE_LONG)}")
    return value if kind == "int" else float(value)


def _device(value) -> str:
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda", "mps")
                                          or (value.startswith("cuda:") and value[5:].isdigit())):
        raise ConfigError(f"'device' must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {shown(value, QUOTE_LONG)}")
    return value


def config_from_dict(data: dict, base: str | Path = ".") -> TrainConfig:
    """A checked ``TrainConfig`` from parsed TOML; relative paths resolve against ``base``."""
    unknown = sorted(set(data) - set(KINDS))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(KINDS), n=1)
        raise ConfigError(f"unknown key {shown(unknown[0], QUOTE_LONG)}" + (f" (did you mean '{near[0]}'?)" if near else "")
                          + f"; known keys: {', '.join(KINDS)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    values = {k: _check(k, v, Path(base)) for k, v in data.items()}
    if values.get("lr") is not None and values["lr"] <= 0:
        raise ConfigError(f"'lr' must be > 0, got {values['lr']}")
    cfg = TrainConfig(**values)
    if cfg.clip_frames % 4 != 1:
        raise ConfigError(f"'clip_frames' must be 4k+1 (Wan2.1's VAE maps 4k+1 frames to k+1 latent frames), "
                          f"got {cfg.clip_frames}; the nearest are {(cfg.clip_frames - 1) // 4 * 4 + 1} and "
                          f"{(cfg.clip_frames - 1) // 4 * 4 + 5}")
    if cfg.view_rope_fov > 360:
        raise ConfigError(f"'view_rope_fov' is the clips' horizontal field of view in degrees, at most 360 (0: off), "
                          f"got {cfg.view_rope_fov:g}")
    for key in ("width", "height"):
        if getattr(cfg, key) % 16:
            raise ConfigError(f"'{key}' must be a multiple of 16 (8x VAE, 2x patch), got {getattr(cfg, key)}")
    for key in ("reference_width", "reference_height"):
        if getattr(cfg, key) % 8:
            raise ConfigError(f"'{key}' must be a multiple of 8 (8x VAE), got {getattr(cfg, key)}")
    if cfg.reference_clip_frames and cfg.reference_clip_frames % 4 != 1:
        raise ConfigError(f"'reference_clip_frames' must be 4k+1, got {cfg.reference_clip_frames}")
    if cfg.reference_pool and cfg.reference_pool < cfg.top_k_references:
        raise ConfigError(f"'reference_pool' ({cfg.reference_pool}) must be 0 (fixed references) or at least "
                          f"top_k_references ({cfg.top_k_references}): each step draws top_k_references from it")
    if cfg.encoder_window > cfg.latent_frames:
        raise ConfigError(f"'encoder_window' ({cfg.encoder_window}) must be at most the clip's {cfg.latent_frames} "
                          f"latent frames ('clip_frames' {cfg.clip_frames}); 0 denoises the whole clip")
    if cfg.recipe == "encoder" and cfg.lora_rank:
        raise ConfigError("'lora_rank' applies to the query recipe; the encoder recipe trains the whole encoder "
                          "against a frozen Wan2.1 (set lora_rank = 0)")
    if cfg.data_format == "videos" and cfg.vae_file is None:
        raise ConfigError("missing required key(s): vae_file (the Wan2.1 VAE encodes the videos; with pre-encoded "
                          "latents set data_format = \"latents\")")
    if cfg.host == "diffusers" and cfg.data_format != "latents":
        raise ConfigError('host = "diffusers" trains on pre-encoded clips: set data_format = "latents" '
                          '(<clip>.safetensors holding latent [16, T, H, W])')
    if (cfg.recipe == "query" or cfg.query_file is not None) and cfg.predict_latent_frames >= cfg.latent_frames:
        raise ConfigError(f"'predict_latent_frames' ({cfg.predict_latent_frames}) must be below the clip's "
                          f"{cfg.latent_frames} latent frames ('clip_frames' {cfg.clip_frames}), leaving "
                          "room for context")
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a TOML training config; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {shown_path(path)}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return config_from_dict(data, path.resolve().parent)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{shown_path(path)}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown_path(path)}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as "
                          "UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{shown_path(path)}: nested too deeply to read; write the config as flat keys") from None
    except ConfigError as e:
        raise ConfigError(f"{shown_path(path)}: {e}") from None


def example_config(recipe: str = "query") -> str:
    """A commented TOML config for ``recipe``, every key at its default."""
    if recipe not in RECIPES:
        raise ConfigError(f"'recipe' must be one of {', '.join(repr(r) for r in RECIPES)}, got {recipe!r}")
    query = recipe == "query"
    what = ("MemLearner: fine-tune Wan2.1 so its first query layers fetch their own context" if query else
            "DiT-Mem: train a memory encoder against a frozen Wan2.1")
    return f"""# {what}.
# Relative paths are relative to this file's folder.
recipe = "{recipe}"
data_dir = "data"        # captioned videos (captions.json or <video>.txt), optional <video stem>.poses.json
output_dir = "runs/{recipe}"   # checkpoints (step-XXXXXXXX/) and the latent cache
model_file = "models/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"
vae_file = "models/vae/wan_2.1_vae.safetensors"
text_encoder_file = "models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"   # encodes the captions
# cache_dir = "runs/{recipe}/latent_cache"   # default: <output_dir>/latent_cache
# encoder_file = "models/memory_encoders/dit_mem_1.3b.safetensors"   # encoder recipe: initial weights

steps = 10000
batch_size = 1           # clips per step and process (gradients accumulated)
lr = {DEFAULT_LR[recipe]:g}
weight_decay = 0.01
checkpoint_every = 500
keep_checkpoints = 3     # older checkpoints are deleted
seed = 0

clip_frames = 81         # video frames per clip, 4k+1 (81 -> 21 latent frames)
width = 832              # multiples of 16
height = 480
mixed_precision = "bf16" # "bf16" or "fp32"
gradient_checkpointing = true
device = "auto"          # CUDA when present, else the CPU; or "cpu", "cuda:1", ...
data_format = "videos"   # or "latents": <clip>.safetensors holding latent [16, T, H, W] (+ poses [T, 3, 4])
text = "captions"        # or "none": train without text (an empty text embedding)
warmup_steps = 0         # linear learning-rate warmup
grad_clip = 0.0          # gradient-norm clipping (0 = off)
lora_rank = 0            # 0 = full fine-tune; e.g. 64 = LoRA adapters only (query recipe, needs peft)
host = "comfyui"         # or "diffusers": train diffusers' WanTransformer3DModel (needs data_format = "latents")

# query recipe (MemLearner)
query_layers = 5
query_pool = 1                 # 2: one query token per 2x2 cell (4x fewer; run the nodes with the same value)
predict_latent_frames = 2      # P: latent frames denoised per clip; the loss counts only these
max_context_multiple = 9       # context length uniform in 0 .. 9 x P latent frames (capped by the clip)
context_policies = ["all", "recent", "fov", "framepack"]   # how the context is picked, as Memory Rollout does (or "learned")
camera_init = "zeros"          # "normal" when training a model from scratch
camera_init_std = 0.5
view_rope_fov = 0.0            # the clips' horizontal field of view (degrees): view-aligned RoPE; 0 = off

# encoder recipe (DiT-Mem)
top_k_references = 5           # reference videos per clip, by caption similarity (text = "none": same caption)
reference_pool = 0             # 0: fixed references; n: each step draws top_k_references of the n best
reference_clip_frames = 0      # the references' size for the encoder (0: as the clips)
reference_width = 0
reference_height = 0
encoder_window = 0             # latent frames denoised per step, a random window (0: the whole clip)
# query_file = "models/memlearner/my_query.safetensors"
#   query recipe: the camera MLP continues from these query weights;
#   encoder recipe: the frozen model's query weights: the encoder trains with query memory on
"""
