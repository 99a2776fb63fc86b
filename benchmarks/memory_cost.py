"""What the pack's two memories cost on ComfyUI's Wan2.1, per denoising step and over a long-video rollout.

Model: ComfyUI's own ``WanModel`` in a Wan2.1 T2V shape (``--size 1.3b``: dim 1536, FFN 8960, 12 heads, 30 blocks;
``--size tiny``: dim 256, 2 heads, 4 blocks, for the CPU smoke run) with random weights (nothing is downloaded),
loaded through ``comfy.sd.load_diffusion_model_state_dict`` into a real ComfyUI MODEL and patched by the pack's
``apply_memory``. One step is one forward of the cond + uncond batch (B=2) through ``patched_forward``; at 1.3B a
chunk is 81 frames at 480x832 (21 x 60 x 104 latent, 32,760 tokens).

Measured per configuration (``CONFIGURATIONS``, plain data): plain Wan; DiT-Mem with k=5 references (the official
1000 tokens and the de-duplicated ones); query memory with a history of 0, 1, 3, 9 chunk lengths, with and without
the context cache; and Context-as-Memory style full concatenation at the same history sizes, measured as what it
costs: a plain Wan forward on a latent of T + T_context frames (every layer attends over history + chunk). The
first step, which fills the caches (memory tokens, context keys/values), is reported apart as ``first_step_ms``;
then the median of ``--steps`` timed steps (CUDA events on a GPU, ``perf_counter`` on CPU) and the peak memory
(``torch.cuda.max_memory_allocated``, reset per configuration; on CPU the process's peak RSS).

Rollout: ``--chunks`` chunks per context policy (all, recent, fov, framepack) under one token budget; before each
chunk the policy picks the context from a ``MemoryBank`` of everything before it (random latents stand in for
generated ones, an orbit camera for ``fov``); a fresh run's first step (the cache fill) and then cached steps are
timed: the time per denoising step per chunk, not a whole chunk's sampling.

Floor: the analytic matmul FLOPs of each configuration (``step_flops``) over the device's bf16 (or ``--dtype``)
matrix rate, measured with one large GEMM; ``achieved = floor_ms / step_ms``. Targets are checked and every miss
says by how much. On CPU the figures are meaningless: the smoke run proves the pipeline only.

    python benchmarks/memory_cost.py --size 1.3b --out benchmarks/results
    python benchmarks/memory_cost.py --size tiny --device cpu --out /tmp/bench --steps 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

PACK = Path(__file__).resolve().parents[1]
SECTIONS = ("plain", "dit_mem", "query", "concat", "rollout")
POLICIES = ("all", "recent", "fov", "framepack", "learned")
MULTIPLES = (0, 1, 3, 9)  # history length in chunk lengths

WAN_COMMON = dict(model_type="t2v", in_dim=16, out_dim=16, text_dim=4096, freq_dim=256, text_len=512)
SIZES = {  # text: umt5 tokens per prompt (512 in Wan2.1; the tiny smoke run uses a few to stay fast on CPU)
    "1.3b": dict(wan=dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30), latent=(21, 60, 104), text=512,
                 query_layers=5, encoder={}, gemm_n=8192),
    "tiny": dict(wan=dict(dim=256, ffn_dim=512, num_heads=2, num_layers=4), latent=(3, 8, 8), text=16,
                 query_layers=1, encoder=dict(hidden_channels=(32, 48), width=256, latent_shape=(13, 16, 16), heads=8),
                 gemm_n=512),
}

# One entry per measured configuration. ``query`` holds extra QueryMemory fields (``query_pool``: one query token
# per pool x pool cell; the FLOP counter reads it as Q pooled spatially by that factor).
CONFIGURATIONS = [
    dict(name="plain", kind="plain", method="plain Wan", context=0),
    dict(name="dit_mem_official", kind="dit_mem", method="DiT-Mem k=5, official tokens", context=0, refs=5,
         deduplicate=False),
    dict(name="dit_mem_dedup", kind="dit_mem", method="DiT-Mem k=5, de-duplicated", context=0, refs=5,
         deduplicate=True),
    *(dict(name=f"query_{m}x_cache", kind="query", method="query memory (context cache)", context=m, cache=True)
      for m in MULTIPLES),
    *(dict(name=f"query_{m}x_nocache", kind="query", method="query memory (no cache)", context=m, cache=False)
      for m in MULTIPLES),
    *(dict(name=f"query_{m}x_pool2", kind="query", method="query memory, Q pooled 2x2 (context cache)", context=m,
           cache=True, query=dict(query_pool=2)) for m in MULTIPLES),
    *(dict(name=f"concat_{m}x", kind="concat", method="full context concatenation", context=m)
      for m in MULTIPLES if m),  # at 0x it is plain Wan
]


# --- FLOP counter (no ComfyUI needed) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The DiT's matmul shape: width, FFN width, blocks, text tokens; 64 = 16 channels x 1x2x2 patch."""

    dim: int
    ffn: int
    layers: int
    text_len: int = 512
    text_dim: int = 4096
    patch_in: int = 64

    @classmethod
    def of(cls, size: str) -> Shape:
        w = SIZES[size]["wan"]
        return cls(w["dim"], w["ffn_dim"], w["num_layers"], SIZES[size]["text"])


def layer_flops(s: Shape, tokens: int, pairs: int, extra: float = 0.0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one block for one sample: ``tokens`` rows through self-attention
    q/k/v/o, cross-attention q/o and the FFN; ``pairs`` query-key pairs of self-attention (QK^T and PV); cross-
    attention over the text (its k/v projections included); ``extra`` FLOPs of extra key/value projections."""
    d = s.dim
    linear = tokens * (12 * d * d + 4 * d * s.ffn)
    attention = 4 * d * (pairs + tokens * s.text_len)
    return linear + 4 * d * d * s.text_len + attention + extra


def step_flops(s: Shape, p: int, kind: str, context: int = 0, query_layers: int = 0, cache: bool = True,
               memory: int = 0, q: int | None = None, batch: int = 2, frames: int = 0, summary: int = 0) -> dict:
    """FLOPs of one denoising step of ``batch`` samples with ``p`` predicted tokens: ``step`` (every step) and
    ``once`` (per sampling run: the cached context keys/values).

    kind ``plain``; ``concat`` (``context`` extra tokens in every layer); ``dit_mem`` (``memory`` extra keys in
    every layer, their k/v projected per step); ``query`` (``q`` query tokens, P by default; in the first
    ``query_layers`` blocks Q reads ``[C; P]``, elsewhere P; P always reads ``[Q; P]``; the C keys/values are
    computed with batch 1 through q/k/v as the patch does, per step without the cache; the learned policy,
    ``frames`` history frames of ``summary`` tokens each, adds each query layer's scoring,
    ``context_routing.scoring_flops``, with ``context`` then one layer's read). Norms, RoPE, modulation and the
    time embedding are left out (element-wise or negligible)."""
    d, n_layers = s.dim, s.layers
    embed = lambda n, out=None: 2 * s.patch_in * d * (n + (n if out is None else out))  # noqa: E731  patch in, head out
    text = 2 * s.text_len * (s.text_dim * d + d * d)
    once = 0.0
    if kind == "plain":
        per = n_layers * layer_flops(s, p, p * p) + embed(p)
    elif kind == "concat":
        n = p + context
        per = n_layers * layer_flops(s, n, n * n) + embed(n)
    elif kind == "dit_mem":
        per = n_layers * layer_flops(s, p, p * (p + memory), 4 * d * d * memory) + embed(p)
    elif kind == "query":
        q = p if q is None else q
        gen = layer_flops(s, q + p, q * p + p * (q + p))
        qry = layer_flops(s, q + p, q * (context + p) + p * (q + p))
        per = query_layers * qry + (n_layers - query_layers) * gen + embed(q + p, p)  # Q leaves before the head
        ctx = query_layers * 4 * d * d * context + 2 * s.patch_in * d * context  # batch 1, k/v only
        if frames:  # the learned policy: the summaries embedded, then scored in each query layer
            from memlearner_core.context_routing import scoring_flops

            ctx += 2 * s.patch_in * d * frames * summary + query_layers * scoring_flops(frames, summary, q, d)
        once = ctx if cache else 0.0
        return dict(step=batch * (per + text) + (0.0 if cache else ctx), once=once)
    else:
        raise ValueError(f"unknown configuration kind {kind!r}")
    return dict(step=batch * (per + text), once=once)


def query_tokens(latent: tuple[int, int, int], pool: int = 1) -> int:
    """Q's token count for a latent ``(T, H, W)``: P's (pool 1), or one per ``pool x pool`` cell of P's grid."""
    t, h, w = latent
    return t * math.ceil(h / 2 / pool) * math.ceil(w / 2 / pool)


# --- ComfyUI as a library ------------------------------------------------------------------------------------------

def load_comfy(device: str):
    """ComfyUI importable (CPU mode chosen before model management loads), then the pack as ``comfyui_memlearner``;
    returns its ``nodes.memory_patch``, ``nodes.comfy_adapter`` and ComfyUI's folder."""
    try:
        import memlearner_core  # noqa: F401
    except ImportError:  # not pip-installed: appended, so the pack's ``nodes`` never shadows ComfyUI's
        sys.path.append(str(PACK))
    import importlib

    from memlearner_train.cli import comfyui_path, load_pack

    comfy_dir = comfyui_path()
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    load_pack(comfy_dir)
    return (importlib.import_module("comfyui_memlearner.nodes.memory_patch"),
            importlib.import_module("comfyui_memlearner.nodes.comfy_adapter"), comfy_dir)


def random_value(name: str, shape, gen, device, dtype) -> torch.Tensor:
    """Seeded weights with unit-variance outputs (fan-in scaling), unit-ish norm gains, small biases/modulation."""
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("modulation"):
        x = 0.1 * x
    elif len(shape) >= 2:
        x = x / math.sqrt(math.prod(shape[1:]))
    elif "norm" in name and name.endswith("weight"):
        x = 1 + 0.1 * x
    else:
        x = 0.02 * x
    return x.to(dtype)


def random_state_dict(module: torch.nn.Module, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random values for every tensor of ``module`` (built on the meta device), made on ``device``."""
    gen = torch.Generator(device).manual_seed(seed)
    return {k: random_value(k, v.shape, gen, device, dtype) for k, v in module.state_dict().items()}


def random_wan_state_dict(size: str, device, dtype) -> dict[str, torch.Tensor]:
    """A Wan2.1 T2V state dict of ``size`` (``1.3b``: the released architecture) with random values."""
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        meta = comfy.ldm.wan.model.WanModel(**WAN_COMMON, **SIZES[size]["wan"], operations=comfy.ops.disable_weight_init)
    return random_state_dict(meta, device, dtype)


def build_model(size: str, device: str, dtype: torch.dtype):
    """A ComfyUI MODEL (ModelPatcher over WAN21) with a random Wan2.1 state dict of ``size``, on ``device``."""
    import comfy.model_management
    import comfy.sd

    sd = random_wan_state_dict(size, device, dtype)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    comfy.model_management.load_models_gpu([model])
    return model


def build_encoder(size: str, device: str, dtype: torch.dtype, wa):
    """The DiT-Mem memory encoder of ``size`` with PyTorch's default random init, as a ComfyUI-managed module."""
    import comfy.model_management

    from memlearner_core.memory_encoder import EncoderConfig, MemoryEncoder

    torch.manual_seed(1)
    enc = wa.managed_module(MemoryEncoder(EncoderConfig(**SIZES[size]["encoder"])).eval().to(device, dtype))
    comfy.model_management.load_models_gpu([enc])
    return enc


# --- timing ----------------------------------------------------------------------------------------------------------

def timed_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def measure(fn, device: str, wa, args, reuse_first: bool = False) -> dict:
    """First step (fills caches; recorded), ``--warmup`` untimed steps, then the median of the timed steps (fewer
    when one step is long: ``--config-budget-s``; none more for plain/concat steps over ``--long-step-s``)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = None
    wa.reset_peak_memory(device)
    first = timed_ms(fn, device)
    if reuse_first and first > args.long_step_s * 1e3:
        times = [first]
    else:
        for _ in range(args.warmup):
            fn()
        n = max(1, min(args.steps, int(args.config_budget_s * 1e3 // max(first, 1e-3))))
        times = [timed_ms(fn, device) for _ in range(n)]
    kind, peak = wa.peak_memory_mb(device)
    return dict(step_ms=round(statistics.median(times), 3), step_ms_samples=[round(t, 3) for t in times],
                first_step_ms=round(first, 3), peak_mb=round(peak, 1),
                baseline_mb=None if baseline is None else round(baseline, 1), memory_kind=kind)


def matrix_rate(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> dict:
    """The device's dense matrix rate: median of ``reps`` ``n x n x n`` GEMMs in ``dtype``."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    ms = statistics.median(timed_ms(lambda: a @ b, device) for _ in range(reps))
    return dict(n=n, dtype=str(dtype).removeprefix("torch."), median_ms=round(ms, 4),
                tflops=round(2 * n**3 / (ms / 1e3) / 1e12, 3))


# --- the sections ----------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, mp, wa):
        self.args, self.mp, self.wa = args, mp, wa
        self.dev, self.dtype = args.device, args.torch_dtype
        self.size = SIZES[args.size]
        self.latent = self.size["latent"]
        self.shape = Shape.of(args.size)
        t, h, w = self.latent
        self.p = query_tokens(self.latent)
        self.gen = torch.Generator().manual_seed(0)
        self.model = build_model(args.size, self.dev, self.dtype)
        self.ts = torch.full((2,), 600.0, device=self.dev)
        self.txt = self.randn(2, self.size["text"], WAN_COMMON["text_dim"]).to(self.dev, self.dtype)
        self.encoder = None

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)

    def x(self, frames: int) -> torch.Tensor:
        t, h, w = self.latent
        return self.randn(2, 16, frames, h, w).to(self.dev, self.dtype)

    def forward(self, model, x, run=None):
        def step():
            with torch.inference_mode():
                self.mp.patched_forward(model, x, self.ts, self.txt, [0, 1], run)
        return step

    def output_difference(self, model, reference, x) -> float:
        """``|out - ref| / |ref|`` (Frobenius) of one forward of ``model`` against ``reference`` on the same input
        and query-noise seed. With random weights this is how far the pooled queries move an untrained model, not
        a quality measure: that needs a model fine-tuned with the pool."""
        with torch.inference_mode():
            out = self.mp.patched_forward(model, x, self.ts, self.txt, [0, 1], self.mp.RunState(0)).float()
            ref = self.mp.patched_forward(reference, x, self.ts, self.txt, [0, 1], self.mp.RunState(0)).float()
        return round(float((out - ref).norm() / ref.norm()), 5)

    def run_config(self, cfg: dict) -> dict:
        mp, t = self.mp, self.latent[0]
        kind, mult = cfg["kind"], cfg.get("context", 0)
        row = {k: v for k, v in cfg.items()}
        row.update(context_frames=mult * t, chunk_tokens=self.p)
        if kind in ("plain", "concat"):
            x = self.x(t + mult * t)
            res = measure(self.forward(self.model, x), self.dev, self.wa, self.args, reuse_first=True)
            flops = step_flops(self.shape, self.p, kind, context=mult * self.p)
            row.update(context_tokens=mult * self.p)
        elif kind == "dit_mem":
            if self.encoder is None:
                self.encoder = build_encoder(self.args.size, self.dev, self.dtype, self.wa)
            lt = self.encoder.model.cfg.latent_shape
            videos = [self.randn(16, *lt) for _ in range(cfg["refs"])]
            memory = mp.ReferenceMemory.from_latents(videos, self.encoder, 1.0, cfg["deduplicate"])
            patched = mp.apply_memory(self.model, memory=memory)
            res = measure(self.forward(patched, self.x(t), mp.RunState(0)), self.dev, self.wa, self.args)
            tokens = memory.tokens()
            keys = int(torch.isfinite(tokens.log_weight[0]).sum())
            flops = step_flops(self.shape, self.p, kind, memory=keys)
            row.update(memory_tokens=tokens.total, memory_keys=keys)
        elif kind == "query":
            extra = cfg.get("query", {})
            nq = query_tokens(self.latent, extra.get("query_pool", 1))
            history = self.randn(16, mult * t, *self.latent[1:])
            context = mp.context_in_model_space(mp.ContextSpec.from_history(history))
            query = mp.QueryMemory(self.size["query_layers"], context, cache_context=cfg["cache"], **extra)
            patched = mp.apply_memory(self.model, query=query)
            x = self.x(t)
            res = measure(self.forward(patched, x, mp.RunState(0)), self.dev, self.wa, self.args)
            flops = step_flops(self.shape, self.p, kind, mult * self.p, self.size["query_layers"], cfg["cache"], q=nq)
            row.update(context_tokens=mult * self.p, query_tokens=nq, query_layers=self.size["query_layers"])
            if extra.get("query_pool", 1) > 1:
                full = mp.apply_memory(self.model, query=mp.QueryMemory(self.size["query_layers"], context))
                row.update(output_diff_vs_full_q=self.output_difference(patched, full, x))
        else:
            raise ValueError(f"unknown configuration kind {kind!r}")
        row.update(res, flops=flops["step"], once_flops=flops["once"])
        return row

    def rollout(self, policy: str) -> list[dict]:
        """Per chunk: context picked by ``policy`` from the bank, a fresh run (first step fills the cache), per-step
        time; then a random chunk latent enters the bank."""
        from memlearner_core.context_policy import frame_cost, route_frames, select_context
        from memlearner_core.context_routing import summary_tokens
        from memlearner_core.rollout import MemoryBank, context_tokens
        from memlearner_core.trajectory import preset

        mp, (t, h, w), a = self.mp, self.latent, self.args
        bank = MemoryBank(preset("orbit", a.chunks * t))
        budget = a.rollout_budget * t * frame_cost(h, w)
        rows = []
        for k in range(a.chunks):
            start = bank.n_frames
            picks = select_context(policy, start, budget, (h, w), bank.poses(0, start), bank.poses(start, start + t))
            route = route_frames(policy, a.rollout_budget * t)
            query = mp.QueryMemory(self.size["query_layers"], mp.context_in_model_space(bank.context(picks, start)),
                                   chunk_poses=bank.poses(start, start + t), cache_context=True, route_frames=route)
            patched = mp.apply_memory(self.model, query=query)
            sub = argparse.Namespace(**{**vars(a), "steps": a.rollout_steps})
            res = measure(self.forward(patched, self.x(t), mp.RunState(k)), self.dev, self.wa, sub)
            nc = context_tokens(picks[:route] if route else picks, (h, w))
            routed = dict(frames=len(picks), summary=summary_tokens(h, w)) if route and len(picks) > route else {}
            flops = step_flops(self.shape, self.p, "query", nc, self.size["query_layers"], True, **routed)
            rows.append(dict(chunk=k + 1, first_frame=start, context_frames=len(picks), context_tokens=nc,
                             context=[[p.index, p.pool] for p in picks], **res, flops=flops["step"],
                             once_flops=flops["once"]))
            bank.append(self.randn(16, t, h, w))
            log(f"rollout {policy} chunk {k + 1}: {nc} context tokens, step {res['step_ms']:.1f} ms")
        return rows


# --- results ---------------------------------------------------------------------------------------------------------

def environment(args, comfy_dir: Path) -> dict:
    import comfy.ldm.modules.attention as attention

    sys.path.insert(0, str(comfy_dir))
    try:
        import comfyui_version

        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(PACK), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    cuda = args.device.startswith("cuda")
    try:
        from importlib.metadata import version

        pack_version = version("comfyui-memlearner")
    except Exception:
        pack_version = None
    return dict(device=torch.cuda.get_device_name(args.device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
                device_type="cuda" if cuda else "cpu", torch=torch.__version__, cuda=torch.version.cuda if cuda else None,
                cudnn=torch.backends.cudnn.version() if cuda else None, comfyui=comfy_version,
                attention=attention.optimized_attention.__name__, python=platform.python_version(),
                pack=pack_version, pack_commit=commit, platform=platform.platform())


def check(tid: str, text: str, value, op: str, threshold: float, unit: str = "", extra: dict | None = None) -> dict:
    """A target row: pass/miss, and for a miss how far from the threshold (absolute and relative to it)."""
    row = dict(id=tid, target=text, threshold=threshold, op=op, unit=unit, **(extra or {}))
    if value is None or not math.isfinite(value):
        return dict(row, value=None, status="not measured")
    ok = value >= threshold if op == ">=" else value <= threshold
    row.update(value=round(value, 4), status="pass" if ok else "miss")
    if not ok:
        row.update(by=round(abs(value - threshold), 4), by_relative=round(abs(value / threshold - 1), 4))
    return row


def targets(res: dict) -> list[dict]:
    cfgs = {c["name"]: c for c in res["configurations"]}
    plain = cfgs.get("plain")
    rows = []
    measured = [c for c in res["configurations"] if c.get("achieved") is not None]
    misses = [dict(name=c["name"], achieved=round(c["achieved"], 4), short_by=round(0.6 - c["achieved"], 4))
              for c in measured if c["achieved"] < 0.6]
    worst = min((100 * c["achieved"] for c in measured), default=None)
    rows.append(check("floor", "every step configuration >= 60% of its own FLOP floor (worst one shown)",
                      worst, ">=", 60, "% of floor", dict(misses=misses, configurations=len(measured))))
    for name in ("dit_mem_official", "dit_mem_dedup"):
        v = 100 * (cfgs[name]["step_ms"] / plain["step_ms"] - 1) if plain and name in cfgs else None
        rows.append(check(name, f"{name}: step time within 3% of plain Wan", v, "<=", 3, "% slower than plain"))
    q9, c9 = cfgs.get("query_9x_cache"), cfgs.get("concat_9x")
    rows.append(check("query_vs_concat_9x", "query memory at 9x history with the context cache >= 10x faster per "
                      "step than full context concatenation", c9["step_ms"] / q9["step_ms"] if q9 and c9 else None,
                      ">=", 10.0, "x faster"))
    pooled = [c for c in res["configurations"] if c.get("query", {}).get("query_pool", 1) > 1
              and c.get("context") == 9 and c.get("cache")]
    v = pooled[0]["step_ms"] / plain["step_ms"] if pooled and plain else None
    rows.append(check("pooled_q_9x", "query memory with pooled Q at 9x history costs at most 2x plain Wan", v, "<=",
                      2.0, "x plain", dict(output_diff_vs_full_q=pooled[0].get("output_diff_vs_full_q") if pooled
                                           else None)))
    chunks = res.get("rollout", {}).get("policies", {}).get("all", [])
    by = {r["chunk"]: r for r in chunks}
    last = max(by, default=None)
    v = by[last]["step_ms"] / by[2]["step_ms"] if last and last > 2 and 2 in by else None
    first = by[last]["first_step_ms"] / by[2]["first_step_ms"] if v is not None else None
    rows.append(check("rollout_all", f"rollout 'all' under a fixed budget: per-step time of chunk {last or 10} at "
                      "most 1.2x chunk 2", v, "<=", 1.2, "x chunk 2",
                      dict(first_step_ratio=None if first is None else round(first, 4))))
    return rows


def derive(res: dict) -> None:
    """Floors, achieved fractions, ratios to plain Wan and targets, from the stored times and FLOPs."""
    rate = res["matrix_rate"]["tflops"] * 1e12
    plain = next((c for c in res["configurations"] if c["name"] == "plain"), None)
    rollout_rows = [r for rows in res.get("rollout", {}).get("policies", {}).values() for r in rows]
    for c in res["configurations"] + rollout_rows:
        c["floor_ms"] = round(c["flops"] / rate * 1e3, 3)
        c["achieved"] = round(c["floor_ms"] / c["step_ms"], 4)
        if plain is not None:
            c["x_plain_time"] = round(c["step_ms"] / plain["step_ms"], 4)
            c["x_plain_flops"] = round(c["flops"] / plain["flops"], 4)
    res["targets"] = targets(res)


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(res: dict) -> str:
    env, s = res["environment"], res["settings"]
    out = [f"# Memory cost on Wan2.1 ({s['size']}): {env['device']}", ""]
    if env["device_type"] == "cpu":
        out += ["**CPU smoke run: the figures prove that the pipeline works and mean nothing else.**", ""]
    out += [f"torch {env['torch']} (CUDA {env['cuda']}), ComfyUI {env['comfyui']}, attention `{env['attention']}`, "
            f"pack {env['pack']} @ {str(env['pack_commit'])[:10]}; {s['dtype']}; chunk {s['latent']} latent "
            f"({s['chunk_tokens']:,} tokens), {s['text_tokens']} text tokens, batch 2 (cond + uncond), "
            f"{s['query_layers']} query layers of "
            f"{s['layers']}. Matrix rate: {res['matrix_rate']['tflops']:.4g} TFLOP/s "
            f"({res['matrix_rate']['n']}^3 {res['matrix_rate']['dtype']} GEMM).", "",
            "## Per denoising step", "",
            "Median step time (first step, which fills the caches, separate); floor = matmul FLOPs / matrix rate; "
            "achieved = floor / step. Full concatenation is measured as plain Wan on T + T_context frames.", "",
            "| configuration | context | step ms | timed | first step ms | x plain | peak MB | TFLOP | floor ms "
            "| achieved |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["configurations"]:
        out.append(f"| {c['name']} | {c['context']}x | {fmt(c['step_ms'])} | {len(c['step_ms_samples'])} | "
                   f"{fmt(c['first_step_ms'])} | {fmt(c.get('x_plain_time'), 2)} | {fmt(c['peak_mb'], 0)} | "
                   f"{c['flops'] / 1e12:,.2f} | {fmt(c['floor_ms'])} | {c['achieved']:.0%} |")
    ro = res.get("rollout")
    if ro:
        out += ["", "## Rollout: time per denoising step per chunk", "", ro["note"], ""]
        for policy, rows in ro["policies"].items():
            out += [f"### {policy}", "", "| chunk | context frames | context tokens | first step ms | step ms | "
                    "peak MB | achieved |", "|---:|---:|---:|---:|---:|---:|---:|"]
            out += [f"| {r['chunk']} | {r['context_frames']} | {r['context_tokens']:,} | {fmt(r['first_step_ms'])} | "
                    f"{fmt(r['step_ms'])} | {fmt(r['peak_mb'], 0)} | {r['achieved']:.0%} |" for r in rows]
            out.append("")
    out += ["", "## Targets", "", "| target | value | threshold | result | missed by |", "|---|---:|---:|---|---|"]
    for t in res["targets"]:
        by = "-"
        if t["status"] == "miss":
            by = f"{t['by']:.3g} {t['unit']} ({t['by_relative']:.0%} of the target)"
            if t.get("misses"):
                by += "; " + ", ".join(f"{m['name']} {m['achieved']:.0%}" for m in t["misses"])
        note = f" ({t['note']})" if t.get("note") else ""
        out.append(f"| {t['target']} | {fmt(t['value'], 3)} {t['unit']} | {t['op']} {t['threshold']} | "
                   f"{t['status']}{note} | {by} |")
    if res.get("plot_note"):
        out += ["", res["plot_note"]]
    return "\n".join(out) + "\n"


def plots(res: dict, out: Path) -> list[str]:
    """``step_time_vs_context.png`` (one line per method) and ``rollout_step_time.png``; matplotlib is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        res["plot_note"] = "matplotlib is not installed: no plots were written (pip install matplotlib)."
        return []
    written = []
    cfgs = res["configurations"]
    if cfgs:
        plain = next((c for c in cfgs if c["name"] == "plain"), None)
        right = max(c["context"] for c in cfgs) or 1
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(c["method"] for c in cfgs):
            pts = sorted((c["context"], c["step_ms"]) for c in cfgs if c["method"] == method)
            if method == "full context concatenation" and plain:
                pts = [(0, plain["step_ms"]), *pts]
            if len(pts) == 1 and pts[0][0] == 0:  # no history: a flat reference line
                ax.plot([0, right], [pts[0][1]] * 2, ls="--", lw=1, label=method)
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xlabel="history (chunk lengths)", ylabel="time per step (ms, cond + uncond)", yscale="log",
               title=f"Wan2.1 {res['settings']['size']} on {res['environment']['device']}")
        plain_number = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain_number)
        ax.yaxis.set_minor_formatter(plain_number)
        written.append(save_plot(plt, fig, ax, out / "step_time_vs_context.png"))
    pol = res.get("rollout", {}).get("policies", {})
    if pol:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy, rows in pol.items():
            ax.plot([r["chunk"] for r in rows], [r["step_ms"] for r in rows], marker="o", label=policy)
        ax.set(xlabel="chunk", ylabel="time per step (ms)", title="Rollout: time per denoising step per chunk")
        written.append(save_plot(plt, fig, ax, out / "rollout_step_time.png"))
    return written


def save_plot(plt, fig, ax, path: Path) -> str:
    """Legend, grid, tight layout; writes ``path`` and returns its name."""
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def log(msg: str) -> None:
    print(f"[memory_cost] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", type=Path, default=PACK / "benchmarks" / "results")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--multiples", default=",".join(map(str, MULTIPLES)), help="history sizes to run, in chunks")
    ap.add_argument("--only", default="", help="comma list of configuration names (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 3; CPU 1)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps after the first one")
    ap.add_argument("--config-budget-s", type=float, default=20.0,
                    help="fewer timed steps (at least 1) when they would take longer than this")
    ap.add_argument("--long-step-s", type=float, default=60.0,
                    help="plain/concat steps longer than this: the first step is the only sample")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--rollout-budget", type=int, default=3, help="context budget in chunk lengths of full frames")
    ap.add_argument("--rollout-steps", type=int, default=1, help="timed steps per chunk after the cache-filling one")
    ap.add_argument("--gemm-n", type=int, default=None)
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of an earlier results.json in --out that this run does not redo")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available; use --device cpu (the smoke run)")
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.steps = args.steps or (1 if cpu else 3)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}; known: {', '.join(SECTIONS)}")
    args.multiples = {int(m) for m in args.multiples.split(",") if m}
    args.only = {n for n in args.only.split(",") if n}
    args.policies = [p for p in args.policies.split(",") if p]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mp, wa, comfy_dir = load_comfy(args.device)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args, comfy_dir)
    log(f"{args.size} on {env['device']} ({args.dtype}), sections {','.join(args.sections)}")
    size = SIZES[args.size]
    settings = dict(size=args.size, dtype=args.dtype, latent=list(size["latent"]),
                    chunk_tokens=query_tokens(size["latent"]), batch=2, text_tokens=size["text"],
                    layers=size["wan"]["num_layers"], query_layers=size["query_layers"], steps=args.steps,
                    warmup=args.warmup, config_budget_s=args.config_budget_s, long_step_s=args.long_step_s,
                    timestep=600.0, command=" ".join(sys.argv))
    prev = None
    if args.merge and (out / "results.json").is_file():
        prev = json.loads((out / "results.json").read_text())
        same = (prev["environment"]["device"], prev["settings"]["size"], prev["settings"]["dtype"])
        if same != (env["device"], args.size, args.dtype):
            raise SystemExit(f"--merge: {out / 'results.json'} is from {same}, not "
                             f"{(env['device'], args.size, args.dtype)}; use another --out")

    rate = matrix_rate(args.device, args.torch_dtype, args.gemm_n or size["gemm_n"],
                       reps=10 if args.device != "cpu" else 3)
    log(f"matrix rate {rate['tflops']:.2f} TFLOP/s")
    bench = Bench(args, mp, wa)
    rows = []
    for cfg in CONFIGURATIONS:
        if cfg["kind"] not in args.sections or cfg["context"] not in args.multiples:
            continue
        if args.only and cfg["name"] not in args.only:
            continue
        row = bench.run_config(cfg)
        log(f"{cfg['name']}: step {row['step_ms']:.1f} ms (first {row['first_step_ms']:.1f}), peak {row['peak_mb']:.0f} MB")
        rows.append(row)
    rollout = None
    if "rollout" in args.sections:
        rollout = dict(note=f"Time per denoising step (cond + uncond) of each chunk, not per whole chunk: per chunk "
                            f"the first step (fresh run: fills the context key/value cache) is first_step_ms, then "
                            f"the median of {args.rollout_steps} cached step(s) is step_ms. Budget: "
                            f"{args.rollout_budget} chunk lengths of full-resolution tokens for every policy; "
                            f"random latents stand in for the generated chunks; fov follows an orbit camera.",
                       budget_chunks=args.rollout_budget, chunks=args.chunks,
                       policies={p: bench.rollout(p) for p in args.policies})

    res = dict(benchmark="memory_cost", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               environment=env, settings=settings, matrix_rate=rate, configurations=rows)
    if rollout:
        res["rollout"] = rollout
    if prev is not None:
        done = {r["name"] for r in rows}
        kept = [c for c in prev.get("configurations", []) if c["name"] not in done]
        order = {c["name"]: i for i, c in enumerate(CONFIGURATIONS)}
        res["configurations"] = sorted(kept + rows, key=lambda c: order.get(c["name"], len(order)))
        if "rollout" in prev and "rollout" not in res:
            res["rollout"] = prev["rollout"]
        elif "rollout" in prev:
            res["rollout"]["policies"] = {**prev["rollout"]["policies"], **res["rollout"]["policies"]}
        res["merged_from"] = prev.get("merged_from", []) + [prev["created"]]  # floors use this run's rate
    derive(res)
    res["plots"] = plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))
    for t in res["targets"]:
        extra = f" (missed by {t['by']:.3g}, {t['by_relative']:.0%})" if t["status"] == "miss" else ""
        log(f"target {t['id']}: {t['status']}{extra}")
    log(f"wrote {out / 'results.json'}, results.md, {', '.join(res['plots']) or 'no plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
