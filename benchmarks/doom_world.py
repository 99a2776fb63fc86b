"""Memory on rendered video: ViZDoom (Freedoom 2) clips through the pack's whole user path, measured in RGB.

Stages (a work folder holds everything made; nothing of it is committed but the results):
- ``data``: training clips from the training maps (``doom_world.TRAIN_MAPS``, MAP01-20) written as a user's video
  folder (``memlearner_core.doom_clips``: mp4, caption, poses), and evaluation clips from the held-out maps
  (MAP21-32) with their geometry (depth, masks, exact RGB).
- ``vae``: a Wan2.1 VAE of ComfyUI's own class (``comfy.ldm.wan.vae.WanVAE``) at width ``VAE_DIM``, 16 latent
  channels and Wan2.1's strides, trained on the training videos' frames, so ComfyUI's VAE Loader loads it as a
  Wan2.1 VAE; its reconstruction PSNR on the held-out clips is the ceiling of every configuration.
- ``train``: ``memlearner-train`` on the video folder (VAE encode, latent cache) for each config in
  ``benchmarks/doom/`` from one random init: query memory, query memory with view-aligned RoPE (the recipe that
  re-renders best in the revisit world), and the plain model.
- ``eval``: each held-out clip through a ComfyUI server (``memlearner_host.server.ComfyServer``: its HTTP API,
  executor and nodes): Load Video, VAE Encode of the way out as ``first_chunk``, Camera Path (custom JSON from the
  clip's recorded poses), Memory Rollout with each configuration, VAE Decode, Save Animated WEBP (lossless); then
  RGB PSNR and SSIM against the exact render on revisited, new and moving-object pixels (labels from geometry:
  ``doom_geometry.seen_before``), per revisit by offset from the nearest history pose, and each configuration's
  step cost.

    python benchmarks/doom_world.py all                    # data, VAE, training, evaluation
    python benchmarks/doom_world.py all --quick --work /tmp/dw --out /tmp/dw/out   # a smoke run of every stage
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK))
sys.path.insert(0, str(PACK / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memlearner_core import doom_clips as dc  # noqa: E402
from memlearner_core import doom_world as dw  # noqa: E402

CONFIGS = PACK / "benchmarks" / "doom"
WORK = PACK / "benchmarks" / "results" / "tmp" / "doom"
OUT = PACK / "benchmarks" / "results" / "doom"
WIDTH, HEIGHT = 128, 96  # the model's frames: 160x120 renders at 0.8x (same 4:3, no crop); 16x12 latents
VAE_DIM = 16  # WanVAE base width (Wan2.1's is 96): 3.6M parameters
VAE_FILE = "doom_wan21_vae.safetensors"
TRAIN_SEED, EVAL_SEED = 0, 1_000_000
EVAL_KINDS = (("turn", False), ("retrace", False), ("turn", True))  # (path, monsters on)
HISTORY = 29  # video frames given (the way out): 8 latent frames; the other 32 (8 latent frames) are generated


def boot(work: Path):
    """ComfyUI in-process with the work folder's models (for the VAE and the latent cache)."""
    from memlearner_host import server

    (work / "models").mkdir(parents=True, exist_ok=True)
    nodes, _ = server.boot_in_process(server.write_extra_paths(work / "models", work / "extra_model_paths.yaml"))
    return nodes, server


# --- data ----------------------------------------------------------------------------------------------------------

def make_data(work: Path, clips: int, maps: tuple[str, ...] = dw.TRAIN_MAPS,
              eval_maps: tuple[str, ...] = dw.HELD_OUT_MAPS) -> dict:
    """``work/data``: ``clips`` training videos from ``maps``; ``work/eval``: one clip per held-out map and
    ``EVAL_KINDS``, with geometry. Held-out maps never enter ``data``."""
    if set(maps) & set(dw.HELD_OUT_MAPS):
        raise SystemExit(f"training maps {sorted(set(maps) & set(dw.HELD_OUT_MAPS))} are held out for evaluation")
    began = time.time()
    plan = dc.training_plan(maps, clips, TRAIN_SEED)
    written, given_up = dc.write_plan(work / "data", plan, progress=_every(50, "[doom] training clips"))
    evaluated, unrenderable = [], {}
    for i, map_name in enumerate(eval_maps):
        for kind, monsters in EVAL_KINDS:
            name = f"{map_name}_{kind}{'_monsters' if monsters else ''}"
            if not (work / "eval" / f"{name}.mp4").exists():
                try:
                    dc.write_evaluation_clip(work / "eval", name, map_name, kind, monsters, EVAL_SEED + 10 * i,
                                             HISTORY)
                except RuntimeError as e:  # e.g. a start shut in by closed doors: no walk leaves it
                    unrenderable[name] = str(e)
                    print(f"[doom] no evaluation clip {name}: {e}", flush=True)
                    continue
            evaluated.append(name)
    (work / "eval" / "unrenderable.json").write_text(json.dumps(unrenderable, indent=1))
    print(f"[doom] {written} training clips written ({len(plan) - len(given_up)} in {work / 'data'}, "
          f"{len(given_up)} given up), {len(evaluated)} evaluation "
          f"clips in {work / 'eval'} ({time.time() - began:.0f}s)", flush=True)
    return {"training_clips": len(plan) - len(given_up), "training_maps": list(maps), "eval_clips": evaluated,
            "unrenderable": unrenderable}


def videos_in(folder: Path) -> list[Path]:
    """A folder's clips by name, not the hidden temporary files of one being written."""
    return sorted(p for p in folder.glob("*.mp4") if not p.name.startswith("."))


def _every(n: int, what: str):
    def report(done, total):
        if done % n == 0 or done == total:
            print(f"{what}: {done}/{total}", flush=True)
    return report


# --- the VAE -------------------------------------------------------------------------------------------------------

def wan21_vae(dim: int = VAE_DIM):
    """ComfyUI's Wan2.1 VAE class at width ``dim``, the configuration ``comfy.sd.VAE`` builds for a Wan2.1 file."""
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    for m in vae.modules():  # ComfyUI's ops skip weight init (weights come from a file): torch's own defaults
        for base in (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    return vae


def video_frames(videos: list[Path], wa) -> torch.Tensor:
    """Every frame of ``videos`` through ComfyUI's reader, at the model's size: ``uint8 [N, T, HEIGHT, WIDTH, 3]``."""
    from memlearner_core.training.dataset import resize_and_crop

    return torch.stack([(resize_and_crop(wa.read_video(v), WIDTH, HEIGHT) * 255).round().to(torch.uint8)
                        for v in videos])


def fold_latent_scale(vae, clips: torch.Tensor) -> dict:
    """Rescale the VAE's latents, per channel, to Wan2.1's latent statistics (``comfy.latent_formats.Wan21``'s
    ``latents_mean`` and ``latents_std``) without changing what it reconstructs: the encoder's last 1x1 conv
    (``conv1``, whose first 16 channels are the latent) is scaled and shifted, and the decoder's first (``conv2``)
    undoes it. ``clips [N, 3, T, H, W]`` in ``-1..1`` give the statistics. So the DiT sees latents scaled as Wan2.1's
    after ComfyUI's ``process_in``."""
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    wan_mean = torch.as_tensor(fmt.latents_mean).float().flatten()  # ComfyUI keeps them [1, 16, 1, 1, 1]
    wan_std = torch.as_tensor(fmt.latents_std).float().flatten()
    with torch.no_grad():
        z = torch.cat([vae.encode(c[None]) for c in clips])  # [N, 16, t, h, w]
        m, s = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4)).clamp_min(1e-6)
        a, b = wan_std / s, wan_mean - m * wan_std / s
        w1, b1 = vae.conv1.weight, vae.conv1.bias  # [32, 32, 1, 1, 1]: rows 0..15 are the latent
        w1[:16] *= a.view(16, 1, 1, 1, 1)
        b1[:16] = b1[:16] * a + b
        w2, b2 = vae.conv2.weight, vae.conv2.bias  # [16, 16, 1, 1, 1] reads the latent
        b2 -= (w2[:, :, 0, 0, 0] * (b / a)).sum(1)
        w2 /= a.view(1, 16, 1, 1, 1)
    return {"latent_mean_before": [round(v, 4) for v in m.tolist()], "latent_std_before": [round(v, 4) for v in s.tolist()]}


def check_vae(work: Path, vae, clips: int = 6) -> dict:
    """What the VAE does to whole held-out clips (every frame at the model's size): the round trip's RGB PSNR,
    beside a flat frame of each clip's mean colour (a VAE that does not beat it by far cannot show memory)."""
    from memlearner_core.image_metrics import frame_scores

    out = {"clips": [], "round_trip_psnr": [], "flat_psnr": []}
    for video in eval_clips(work, clips):
        truth = truth_frames(dc.read_geometry(video))
        with torch.no_grad():
            r = vae.decode(vae.encode(truth.permute(3, 0, 1, 2)[None] * 2 - 1))
        recon = ((r[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
        flat = truth.mean((0, 1, 2), keepdim=True).expand_as(truth).contiguous()
        out["clips"].append(video.stem)
        out["round_trip_psnr"].append(frame_scores(recon, truth)["psnr"])
        out["flat_psnr"].append(frame_scores(flat, truth)["psnr"])
    if out["clips"]:
        print(f"[doom] VAE round trip of {len(out['clips'])} whole held-out clips: "
              f"{statistics.mean(out['round_trip_psnr']):.2f} dB (a flat frame of each clip's mean colour: "
              f"{statistics.mean(out['flat_psnr']):.2f} dB)", flush=True)
    return out


def train_vae(work: Path, minutes: float, max_clips: int = 400, batch: int = 4, crop: int = 64,
              seed: int = 0, lr: float = 2e-4, window: int = 13) -> dict:
    """The narrow Wan2.1 VAE as an autoencoder on ``window``-frame windows (4k + 1: one frame alone, then chunks of
    four, so its causal cache is trained from chunk to chunk; 5-frame windows left it drifting after the first
    chunk) of the training videos, random ``crop`` squares, for ``minutes``: L1 + MSE in pixels, AdamW at ``lr``
    with warmup and cosine decay over the time given; the weights kept are those of the 50-step window of lowest
    mean loss, their latents then rescaled to Wan2.1's statistics (``fold_latent_scale``). Written to the work
    folder's ``models/vae``, with ``check_vae``'s figures in ``vae.json``."""
    import copy

    from safetensors.torch import save_file

    _, server = boot(work)
    wa = server.pack("nodes.comfy_adapter")
    videos = videos_in(work / "data")[:max_clips]
    frames = video_frames(videos, wa)  # [N, T, H, W, 3] uint8
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = wan21_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    began, step, log, losses = time.time(), 0, [], []
    best = (float("inf"), None, 0)

    if window % 4 != 1 or window > frames.shape[1]:
        raise SystemExit(f"--vae-window {window}: must be 4k + 1 and at most a clip's {frames.shape[1]} frames")

    def windows(n: int, size_y: int, size_x: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            i, t = rng.randrange(len(frames)), rng.randrange(frames.shape[1] - window + 1)
            y, x = rng.randrange(0, HEIGHT - size_y + 1, 8), rng.randrange(0, WIDTH - size_x + 1, 8)
            out.append(frames[i, t:t + window, y:y + size_y, x:x + size_x])
        return torch.stack(out).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [n, 3, window, y, x] in -1..1

    while (elapsed := time.time() - began) < minutes * 60:
        progress = elapsed / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        clip = windows(batch, crop, crop)
        recon = vae.decode(vae.encode(clip))
        loss = (recon - clip).abs().mean() + F.mse_loss(recon, clip)
        if not torch.isfinite(loss):
            raise RuntimeError(f"VAE training diverged at step {step} (loss {loss.item()}); nothing was written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            avg = sum(losses) / len(losses)
            losses = []
            if avg < best[0]:
                best = (avg, copy.deepcopy(vae.state_dict()), step)
            log.append({"step": step, "seconds": round(time.time() - began), "mean_loss_50": round(avg, 4)})
            print(f"[doom] vae step {step} ({log[-1]['seconds']}s): mean loss {avg:.4f} over 50 steps", flush=True)
    if best[1] is not None:
        vae.load_state_dict(best[1])
    path = work / "models" / "vae" / VAE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()},
              str(work / "models" / "vae_unscaled.safetensors"))  # as trained, before the rescaling
    scale = fold_latent_scale(vae, windows(8, HEIGHT, WIDTH))
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(path))
    info = {"dim": VAE_DIM, "parameters": sum(p.numel() for p in vae.parameters()), "steps": step,
            "kept_step": best[2] or step, "seconds": round(time.time() - began), "batch": batch, "crop": crop,
            "window": window, "lr": lr, "clips": len(videos), "log": log, **scale, "check": check_vae(work, vae)}
    (work / "vae.json").write_text(json.dumps(info, indent=1))
    print(f"[doom] VAE trained: {step} steps in {info['seconds']}s (kept step {info['kept_step']}) -> {path}",
          flush=True)
    return info


# --- training ------------------------------------------------------------------------------------------------------

MODELS = ("query", "query_view_rope", "no_memory")  # the equal-budget runs (configs in benchmarks/doom/)


def config_paths(work: Path):
    """``name -> the config's paths`` in ``work``: its data, run folder, initial model, VAE and the shared cache."""
    def paths(name: str) -> dict:
        return {"data_dir": work / "data", "output_dir": work / "runs" / name,
                "model_file": work / "models" / "diffusion_models" / "doom_init.safetensors",
                "vae_file": work / "models" / "vae" / VAE_FILE, "cache_dir": work / "latent_cache"}
    return paths


def encode_clips(work: Path) -> dict:
    """The shared random initial model, and every training video encoded once by the work folder's VAE into the
    latent cache the configs share, as ``memlearner-train`` encodes them (``ClipFolder``, ``encode_all``), so the
    runs started side by side all read it."""
    from safetensors.torch import save_file

    from memlearner_core.training.config import load_config
    from memlearner_core.training.dataset import ClipFolder, LatentCache, encode_all
    from memlearner_host.tiny_models import tiny_wan

    _, server = boot(work)
    wa = server.pack("nodes.comfy_adapter")
    import comfy.sd
    import comfy.utils

    init = work / "models" / "diffusion_models" / "doom_init.safetensors"
    init.parent.mkdir(parents=True, exist_ok=True)
    if not init.exists():
        save_file({k: v.contiguous() for k, v in tiny_wan(seed=TRAIN_SEED).state_dict().items()}, str(init))
    cfg = load_config(CONFIGS / "query.toml")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(work / "models" / "vae" / VAE_FILE)))
    began = time.time()
    clips = ClipFolder(work / "data", cfg.clip_frames, cfg.width, cfg.height)
    encoded, skipped = encode_all(clips, wa.read_video, lambda frames: vae.encode(frames).detach().cpu(),
                                  LatentCache(work / "latent_cache"), wa.vae_fingerprint(vae))
    print(f"[doom] {len(encoded)} clips encoded into {work / 'latent_cache'} ({len(skipped)} skipped, "
          f"{time.time() - began:.0f}s)", flush=True)
    return {"encoded": len(encoded), "skipped": len(skipped), "seconds": round(time.time() - began)}


def train_models(work: Path, steps: int | None, parallel: int, models=MODELS) -> dict:
    from revisit_world import train_all

    return train_all(work, steps, parallel, models, configs=CONFIGS, paths=config_paths(work), prefix="doom")


# --- evaluation ----------------------------------------------------------------------------------------------------

STEPS, QUERY_LAYERS, BUDGET = 10, 2, 4
TOLERANCE = 0.15  # relative depth agreement for "seen before" (ViZDoom's depth is good to about 4 map units, and
# floors near the camera read about 10 nearer than a pinhole's z)
BOUNDED = ("recent", "fov", "framepack")
BEST = "query_view_rope"  # the recipe that re-renders best in the revisit world: every policy is evaluated on it


def configurations(present: set[str]) -> dict:
    """Each evaluated configuration -> its Memory Rollout settings (``workflows.build.doom_return``), for the models
    whose weights are ``present``: the ``BEST`` recipe with every policy and with its query layers off, the other
    query recipe with all history, the plain model."""
    out = {}
    for model, suffix in (("query_view_rope", "_view_rope"), ("query", "")):
        if model not in present:
            continue
        memory = {"model": f"doom_{model}.safetensors", "query_layers": QUERY_LAYERS,
                  "query_weights": f"doom_{model}_query.safetensors"}
        out[f"all{suffix}"] = {**memory, "policy": "all", "context_frames": 0}
        if model != BEST and BEST in present:  # the other recipe: all history only (decoding is what costs here)
            continue
        for policy in BOUNDED:
            out[f"{policy}{suffix}"] = {**memory, "policy": policy, "context_frames": BUDGET}
        out[f"no_context{suffix}"] = {**memory, "policy": "all", "context_frames": 0, "query_layers": 0,
                                      "query_weights": "none"}
    if "no_memory" in present:
        out["no_memory"] = {"model": "doom_no_memory.safetensors", "policy": "all", "context_frames": 0,
                            "query_layers": 0, "query_weights": "none"}
    return out


def area(mask: torch.Tensor, width: int = WIDTH, height: int = HEIGHT) -> torch.Tensor:
    """``[T, 120, 160]`` -> the share of each model-size pixel's footprint it covers ``[T, height, width]``."""
    return F.interpolate(mask.float()[:, None], size=(height, width), mode="area")[:, 0]


def truth_frames(geom) -> torch.Tensor:
    """The exact render at the model's size, ``[T, HEIGHT, WIDTH, 3]`` in ``[0, 1]`` (area-averaged, as the
    graph's Image Scale does)."""
    x = geom.rgb.permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(HEIGHT, WIDTH), mode="area").permute(0, 2, 3, 1).clamp(0, 1)


def pixel_labels(geom, history: int) -> dict:
    """Per generated frame ``[T - history, HEIGHT, WIDTH]`` bool: ``revisit`` (every part of the pixel's footprint
    was visible in a given frame, at a matching depth, and no monster), ``new`` (no part was), ``moving`` (mostly
    monster). Sky is neither."""
    from memlearner_core.doom_geometry import intrinsics, seen_before

    K = intrinsics(geom.depth.shape[2], geom.depth.shape[1])
    valid = ~geom.sky
    seen = seen_before(geom.depth, geom.poses, K, history, TOLERANCE, valid)
    moving = geom.moving[history:]
    return {"revisit": area(seen & ~moving) > 0.999, "new": area(valid[history:] & ~seen & ~moving) > 0.999,
            "moving": area(moving) > 0.5}


def copy_nearest(geom, history: int, truth: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Each generated frame replaced by the given frame that shows most of it (geometry: most pixels seen there):
    ``[T - history, HEIGHT, WIDTH, 3]`` and the frame each copied."""
    from memlearner_core.doom_geometry import intrinsics, seen_before

    K = intrinsics(geom.depth.shape[2], geom.depth.shape[1])
    valid = ~geom.sky
    picks = []
    for t in range(history, len(geom.depth)):
        overlap = [int(seen_before(geom.depth[[j, t]], geom.poses[[j, t]], K, 1, TOLERANCE, valid[[j, t]]).sum())
                   for j in range(history)]
        picks.append(max(range(history), key=overlap.__getitem__))
    return truth[picks], picks


def pose_offsets(geom, history: int) -> list[tuple[float, float]]:
    """Per generated frame: (yaw degrees, distance map units) to the nearest given latent frame's pose (video
    frames 0, 4, ..., the poses the model's history carries), nearest by yaw then distance."""
    pos, yaw = geom.poses[:, :, 3].double(), torch.atan2(geom.poses[:, 1, 2], geom.poses[:, 0, 2]).double()
    given = list(range(0, history, 4))
    out = []
    for t in range(history, len(pos)):
        d_yaw = [abs((math.degrees(float(yaw[t] - yaw[j])) + 180) % 360 - 180) for j in given]
        j = min(range(len(given)), key=lambda i: (round(d_yaw[i], 3), float((pos[t] - pos[given[i]]).norm())))
        out.append((d_yaw[j], float((pos[t] - pos[given[j]]).norm())))
    return out


YAW_BINS = ((0, 5), (5, 10), (10, 20), (20, 180))  # degrees off the nearest given pose
DIST_BINS = ((0, 4), (4, 16), (16, 64), (64, 1e9))  # map units off it


def eval_clips(work: Path, limit: int | None = None) -> list[Path]:
    return videos_in(work / "eval")[:limit]


def evaluate(work: Path, steps: int = STEPS, limit: int | None = None, timeout: float = 1800,
             only: tuple[str, ...] | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[dict, dict]:
    """Every evaluation clip (of ``shard`` (i, n): clips i, i + n, ...) through a ComfyUI server of its own, one
    prompt a clip with every configuration (or those in ``only``); returns the raw sums (``summarize`` makes the
    figures; ``merge`` adds shards) and one example's frames per configuration (the first ``turn`` clip's)."""
    import shutil

    from memlearner_core.image_metrics import squared_error, ssim_map
    from memlearner_host import server as srv
    from memlearner_host.doom_demo import read_webp, saved
    from workflows import build

    present = {m for m in MODELS if (work / "models" / "diffusion_models" / f"doom_{m}.safetensors").is_file()}
    configs = {k: v for k, v in configurations(present).items() if only is None or k in only}
    if not configs:
        raise SystemExit(f"no trained Doom model in {work / 'models'}: run the train stage first")
    extra = srv.write_extra_paths(work / "models", work / "extra_model_paths.yaml")
    server = srv.ComfyServer(work / f"server{shard[0]}", extra)
    sums: dict = {}
    by_offset: dict = {}
    seconds: dict = {}
    node_scores: dict = {}
    example: dict = {}
    began = time.time()
    try:
        server.wait_ready()
        clips = eval_clips(work, limit)[shard[0]::shard[1]]
        for i, video in enumerate(clips):
            print(f"[doom] evaluating {video.stem} ({i + 1} of {len(clips)}, {time.time() - began:.0f}s)", flush=True)
            shutil.copy(video, server.input_dir / video.name)
            geom = dc.read_geometry(video)
            h = geom.history
            f = {**build.DOOM, "video": video.name, "steps": steps, "vae": VAE_FILE}
            graph = build.doom_return(configs, f, build.doom_trajectory(video.with_suffix(".poses.json")),
                                      save=("webp",), oracle=True, seed=i)
            entry = server.run_prompt(graph, timeout)
            truth = truth_frames(geom)
            preds = {}
            for name in (*configs, "oracle"):
                preds[name] = read_webp(saved(server, entry, f"save_{name}_frames")[0])[h:]
                text = entry["outputs"][f"score_{name}"]["text"][0]
                report = json.loads(text)
                node_scores.setdefault(name, []).append(report["psnr"])
                if "rollout" in report:
                    seconds.setdefault(name, []).extend(c["seconds"] / steps for c in report["rollout"][1:])
            preds["copy_nearest"], _ = copy_nearest(geom, h, truth)
            labels = pixel_labels(geom, h)
            offsets = pose_offsets(geom, h)
            kind = video.stem.split("_", 1)[1]
            for name, pred in preds.items():
                if pred.shape != truth[h:].shape or not torch.isfinite(pred).all():
                    raise RuntimeError(f"{name} on {video.stem}: frames {tuple(pred.shape)}, want "
                                       f"{tuple(truth[h:].shape)} and finite")
                err, ssim = squared_error(pred, truth[h:]), ssim_map(pred, truth[h:])
                for label, mask in labels.items():
                    for key in (label, f"{label}@{kind}"):
                        acc = sums.setdefault(name, {}).setdefault(key, [0.0, 0, 0.0])
                        acc[0] += float(err[mask].sum())
                        acc[1] += int(mask.sum())
                        acc[2] += float(ssim[mask].sum())
                for t, (d_yaw, dist) in enumerate(offsets):
                    mask = labels["revisit"][t]
                    for axis, bins, v in (("yaw", YAW_BINS, d_yaw), ("distance", DIST_BINS, dist)):
                        lo, hi = next(b for b in bins if b[0] <= v < b[1])
                        acc = by_offset.setdefault(name, {}).setdefault(f"{axis} {lo:g}-{hi:g}", [0.0, 0])
                        acc[0] += float(err[t][mask].sum())
                        acc[1] += int(mask.sum())
            if not example or (kind == "turn" and example["kind"] != "turn"):  # the first turn, else any
                example = {"clip": video.stem, "kind": kind, "history": h, "truth": truth,
                           "frames": {k: torch.cat([truth[:h], v]) for k, v in preds.items()}}
    finally:
        server.stop()
    return {"sums": sums, "by_offset": by_offset, "seconds": seconds, "node_scores": node_scores,
            "clips": [p.stem for p in clips]}, example


def merge(parts: list[dict]) -> dict:
    """Raw sums of several shards -> one (sums added, timings and scores pooled)."""
    out: dict = {"sums": {}, "by_offset": {}, "seconds": {}, "node_scores": {}, "clips": []}
    for part in parts:
        for key in ("sums", "by_offset"):
            for name, metrics in part[key].items():
                for metric, values in metrics.items():
                    acc = out[key].setdefault(name, {}).setdefault(metric, [0.0] * len(values))
                    out[key][name][metric] = [a + b for a, b in zip(acc, values, strict=True)]
        for key in ("seconds", "node_scores"):
            for name, values in part[key].items():
                out[key].setdefault(name, []).extend(values)
        out["clips"] += part["clips"]
    return out


def summarize(raw: dict) -> dict:
    """Raw sums (``evaluate``, ``merge``) -> per configuration its PSNR, SSIM and pixel count per label, revisit
    PSNR per pose offset, seconds per step and step cost over the plain model's."""
    from memlearner_core.image_metrics import psnr

    sums, by_offset, seconds, node_scores = raw["sums"], raw["by_offset"], raw["seconds"], raw["node_scores"]
    reference = statistics.median(seconds["no_memory"]) if seconds.get("no_memory") else None
    out = {}
    for name, metrics in sums.items():
        row = {}
        for key, (e, n, s) in metrics.items():
            row[f"{key}_psnr"] = psnr(e, 3 * n)
            row[f"{key}_ssim"] = round(s / n, 4) if n else None
            row[f"{key}_pixels"] = n
        row["revisit_psnr_by_offset"] = {k: psnr(e, 3 * n) for k, (e, n) in by_offset.get(name, {}).items()}
        sec = seconds.get(name)
        row["seconds_per_step"] = round(statistics.median(sec), 4) if sec else None
        row["step_cost_x_plain"] = round(statistics.median(sec) / reference, 2) if sec and reference else None
        row["video_score_psnr_mean"] = (round(statistics.mean(node_scores[name]), 3) if node_scores.get(name)
                                        else None)
        out[name] = row
    return out


def ship(work: Path, model: str, clip: str = "MAP21_turn") -> None:
    """The work folder's ``model`` as the small model shipped in ``memlearner_host/doom_model/`` under the names the
    shipped workflow loads (the DiT and the VAE in fp16, the query weights as trained), and the held-out ``clip``
    (its video, poses and its revisit/new masks from geometry, bits packed) for the main job."""
    import os
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    from memlearner_host.doom_demo import DOOM_MODEL, clip_files
    from workflows import build

    f = build.DOOM
    sources = {work / "models" / "diffusion_models" / f"doom_{model}.safetensors": ("diffusion_models", f["unet"]),
               work / "models" / "memlearner" / f"doom_{model}_query.safetensors": ("memlearner", f["query_weights"]),
               work / "models" / "vae" / VAE_FILE: ("vae", f["vae"])}
    for src in sources:
        if not src.is_file():
            raise SystemExit(f"ship: {src} is not there; run the train stage first")
    video = work / "eval" / f"{clip}.mp4"
    geom = dc.read_geometry(video)
    labels = pixel_labels(geom, geom.history)
    files = clip_files(f["video"])
    for folder in (*{v[0] for v in sources.values()}, "clip"):
        (DOOM_MODEL / folder).mkdir(parents=True, exist_ok=True)
    staged = []
    for src, (folder, name) in sources.items():
        dst = DOOM_MODEL / folder / name
        tensors = load_file(str(src))
        if folder != "memlearner":
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, str(dst.with_suffix(".tmp")))
        else:
            shutil.copyfile(src, dst.with_suffix(".tmp"))
        staged.append(dst)
    packed = {k: torch.from_numpy(np.packbits(v.numpy().reshape(-1))) for k, v in labels.items() if k != "moving"}
    save_file(packed, str(files["labels"].with_suffix(".tmp")),
              metadata={"shape": json.dumps(list(labels["revisit"].shape)), "clip": clip, "map": geom.map_name})
    shutil.copyfile(video, files["video"].with_suffix(".tmp"))
    shutil.copyfile(video.with_suffix(".poses.json"), files["poses"].with_suffix(".tmp"))
    for dst in (*staged, files["labels"], files["video"], files["poses"]):
        os.replace(dst.with_suffix(".tmp"), dst)
        print(f"[doom] shipped {dst.relative_to(PACK)}", flush=True)


# --- results -------------------------------------------------------------------------------------------------------

def _v(results: dict, name: str, key: str) -> float:
    v = results[name][key]
    if v is None:
        raise KeyError(f"{name}.{key}")
    return v


TARGETS = (  # the issue's, for query memory's best model (all_view_rope when it ran, else all)
    ("all >= recent + 3 dB on revisited pixels",
     lambda r, a, s: _v(r, a, "revisit_psnr") >= _v(r, f"recent{s}", "revisit_psnr") + 3),
    ("all >= no memory + 3 dB on revisited pixels",
     lambda r, a, s: _v(r, a, "revisit_psnr") >= _v(r, "no_memory", "revisit_psnr") + 3),
    ("all > copy_nearest on revisited pixels",
     lambda r, a, s: _v(r, a, "revisit_psnr") > _v(r, "copy_nearest", "revisit_psnr")),
    ("all >= no memory - 0.5 dB on new pixels",
     lambda r, a, s: _v(r, a, "new_psnr") >= _v(r, "no_memory", "new_psnr") - 0.5),
    ("moving objects: all > fov", lambda r, a, s: _v(r, a, "moving_psnr") > _v(r, f"fov{s}", "moving_psnr")),
)


def check_targets(results: dict) -> tuple[str, dict]:
    best = "all_view_rope" if "all_view_rope" in results else "all"
    suffix = best.removeprefix("all")
    out = {}
    for name, check in TARGETS:
        try:
            out[name] = bool(check(results, best, suffix))
        except KeyError:
            out[name] = None
    return best, out


COLUMNS = ("revisit_psnr", "revisit_ssim", "new_psnr", "new_ssim", "moving_psnr", "moving_ssim", "step_cost_x_plain")


def write_results(out: Path, results: dict, example: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    best, targets = check_targets(results)
    (out / "results.json").write_text(json.dumps({**meta, "configurations": results, "targets_for": best,
                                                  "targets": targets}, indent=1) + "\n")
    lines = [f"# Doom world: {meta['command']}", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. {len(meta['eval_clips'])} held-out clips "
             f"({', '.join(sorted({c.split('_')[0] for c in meta['eval_clips']}))}; paths turn, retrace, turn with "
             f"monsters), {HISTORY} video frames given, "
             f"{meta['frames'] - HISTORY} generated ({STEPS} euler steps a chunk of 2 latent frames, budget "
             f"{BUDGET} frames for recent/fov/framepack). RGB PSNR (10 log10(1/MSE), 0-1 pixels) and SSIM against "
             f"the exact render at {WIDTH}x{HEIGHT}, on the generated frames' revisited pixels (seen in a given frame "
             f"at a matching depth), new pixels (seen in none) and moving-object (monster) pixels; step cost per "
             f"denoising step over the plain model's, through the server.", ""]
    lines += [f"- {k}: {v}" for k, v in meta["setup"].items()] + [""]
    lines += ["| configuration | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:g}" for c in COLUMNS)
                     + " |")
    kinds = sorted({k.split("@")[1].removesuffix("_psnr") for row in results.values() for k in row
                    if "@" in k and k.endswith("_psnr")})
    lines += ["", "Revisited pixels by path (PSNR dB):", "", "| configuration | " + " | ".join(kinds) + " |",
              "|---" * (len(kinds) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join("-" if row.get(f"revisit@{k}_psnr") is None else
                                                f"{row[f'revisit@{k}_psnr']:g}" for k in kinds) + " |")
    bins = [f"yaw {a:g}-{b:g}" for a, b in YAW_BINS] + [f"distance {a:g}-{b:g}" for a, b in DIST_BINS]
    lines += ["", "Revisited pixels by offset from the nearest given pose (degrees; map units), PSNR dB:", "",
              "| configuration | " + " | ".join(bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for name, row in results.items():
        got = row["revisit_psnr_by_offset"]
        lines.append(f"| {name} | " + " | ".join("-" if got.get(b) is None else f"{got[b]:g}" for b in bins) + " |")
    said = {True: "yes", False: "NO", None: "not measured"}
    lines += ["", f"Targets (for `{best}`):", "", "| target | met |", "|---|---|"]
    lines += [f"| {k} | {said[v]} |" for k, v in targets.items()]
    if meta.get("training"):
        lines += ["", "Training (memlearner-train on the video folder, one thread each, side by side):", ""]
        lines += [f"- {k}: {v['seconds']:.0f} s; {v['result']}" for k, v in meta["training"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, results)
    if example:
        _side_by_side(out, example)


def _plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(12, 4))
    for k, m in enumerate(("revisit_psnr", "new_psnr", "moving_psnr")):
        ax.bar([i + 0.27 * k for i in range(len(names))], [results[n][m] or 0 for n in names], width=0.27, label=m)
    ax.set_xticks([i + 0.27 for i in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("RGB PSNR (dB)")
    ax.set_ylim(bottom=min(8, *(results[n]["revisit_psnr"] or 8 for n in names)) - 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "psnr.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [f"yaw {a:g}-{b:g}" for a, b in YAW_BINS]
    for n in names:
        got = results[n]["revisit_psnr_by_offset"]
        ax.plot(range(len(bins)), [got.get(b) for b in bins], marker="o", label=n)
    ax.set_xticks(range(len(bins)), bins)
    ax.set_xlabel("yaw offset from the nearest given pose (degrees)")
    ax.set_ylabel("revisit RGB PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "psnr_by_offset.png", dpi=100)
    plt.close(fig)


def _side_by_side(out: Path, example: dict) -> None:
    """ground truth | no memory | recent | all of one return, 2x, as an mp4 and a PNG of chosen frames."""
    from revisit_world import save_sheet

    frames = example["frames"]
    best = "all_view_rope" if "all_view_rope" in frames else "all"
    recent = "recent_view_rope" if best == "all_view_rope" else "recent"
    panels = [("ground truth", example["truth"])] + [(p, frames[p]) for p in ("no_memory", recent, best)
                                                        if p in frames]
    video = torch.cat([p for _, p in panels], dim=2)  # [T, H, W * n, 3]
    video = F.interpolate(video.permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
    dc.write_video(out / "return_side_by_side.mp4", (video * 255).round().to(torch.uint8), fps=8)
    h = example["history"]
    save_sheet(video[h::4], out / "return_side_by_side.png")
    (out / "return_side_by_side.txt").write_text(
        f"{example['clip']}: columns " + " | ".join(n for n, _ in panels) + f"; frames {h} on are generated "
        f"(the sheet: every 4th from {h})\n")


def main(argv=None) -> int:
    from revisit_world import run_meta

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["data", "vae", "encode", "train", "eval", "all", "ship"])
    ap.add_argument("--model", default="query_view_rope", choices=MODELS, help="ship: the model to ship")
    ap.add_argument("--work", type=Path, default=WORK, help="videos, runs and models (not committed)")
    ap.add_argument("--out", type=Path, default=OUT, help="results.json, results.md, plots, video")
    ap.add_argument("--clips", type=int, default=800, help="training clips (from MAP01-20 in turn)")
    ap.add_argument("--vae-minutes", type=float, default=60.0, help="the VAE's training time")
    ap.add_argument("--vae-window", type=int, default=13, help="frames of each VAE training window (4k + 1)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    ap.add_argument("--parallel", type=int, default=3, help="trainings at once")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out clips")
    ap.add_argument("--only", default=None, help="evaluate only these configurations (comma-separated)")
    ap.add_argument("--shard", default="0/1", help="eval: i/n evaluates clips i, i + n, ... and keeps its raw sums")
    ap.add_argument("--merge", type=int, default=0, help="eval: the figures of n shards run before (--shard i/n)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings for every stage")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.vae_minutes, args.steps, args.limit = 6, 0.05, 2, 1
        args.only = args.only or "all_view_rope,recent_view_rope,no_memory"
    args.work.mkdir(parents=True, exist_ok=True)
    setup = {}
    if args.stage in ("data", "all"):
        setup["data"] = make_data(args.work, args.clips, eval_maps=dw.HELD_OUT_MAPS[:1] if args.quick else
                                  dw.HELD_OUT_MAPS)
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_minutes, max_clips=400, window=args.vae_window)
    if args.stage in ("encode", "train", "all"):
        encode_clips(args.work)
    if args.stage in ("train", "all"):
        train_models(args.work, args.steps, args.parallel)
    if args.stage in ("eval", "all"):
        steps = 2 if args.quick else STEPS
        i, n = (int(v) for v in args.shard.split("/"))
        if args.merge:
            raw = merge([json.loads((args.work / f"eval_shard_{k}_of_{args.merge}.json").read_text())
                         for k in range(args.merge)])
            examples = [torch.load(p) for p in sorted(args.work.glob(f"eval_example_*_of_{args.merge}.pt"))]
            example = next((e for e in examples if e.get("kind") == "turn"), examples[0] if examples else {})
        else:
            raw, example = evaluate(args.work, steps, args.limit,
                                    only=tuple(args.only.split(",")) if args.only else None, shard=(i, n))
        if n > 1:  # one shard of several: its raw sums, for eval --merge n
            (args.work / f"eval_shard_{i}_of_{n}.json").write_text(json.dumps(raw))
            torch.save(example, args.work / f"eval_example_{i}_of_{n}.pt")
            return 0
        results = summarize(raw)
        record = args.work / "training.json"
        vae = json.loads((args.work / "vae.json").read_text()) if (args.work / "vae.json").exists() else {}
        meta = {**run_meta("doom_world.py", argv), "frames": dc.FRAMES, "steps": steps,
                "training_videos": len(videos_in(args.work / "data")),
                "eval_clips": sorted(raw["clips"]),
                "training": json.loads(record.read_text()) if record.exists() else {},
                "vae": {k: v for k, v in vae.items() if k != "log"},
                "setup": {"vae": f"WanVAE dim {vae.get('dim')}, {vae.get('parameters')} parameters, "
                                 f"{vae.get('steps')} steps in {vae.get('seconds')} s; its round trip is `oracle`",
                          "training data": "MAP01-20 only (benchmarks/results/tmp/doom/data/plan.json)",
                          "resolution": f"rendered 160x120 (ViZDoom's smallest), the model at {WIDTH}x{HEIGHT}"}}
        write_results(args.out, results, example, meta)
        print((args.out / "results.md").read_text())
    if args.stage == "ship":
        ship(args.work, args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
