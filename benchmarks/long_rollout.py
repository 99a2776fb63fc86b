"""Memory within a fixed budget on long rollouts: which history frames a chunk reads, chosen by rule or by the model.

The revisit world's long paths (``memlearner_core.revisit_world.long_case``: three full turns, 48 latent frames, every
place revisited 16 to 32 frames after the history saw it and from a pose the history never had) run through Memory
Rollout in an in-process ComfyUI (the node's own code path) with the toy model shipped in
``memlearner_host/revisit_model`` (or the revisit benchmark's work folder's ``revisit_query``), 2 latent frames a
chunk, 10 euler steps: 16 chunks on ``long_pan`` and ``long_moving_object``, 8 on ``long_occluder``, whose context
reaches 46 frames, 3x the 14 context frames the model was trained with.

Configurations: ``all`` unbounded (every history frame), and ``recent``, ``fov``, ``framepack`` and ``learned`` (each
query layer reads the frames its queries rank highest, ``memlearner_core.context_routing``) at budgets of 2, 4 and 8
frames; the same weights with no context (``query_no_context``); the rules ``copy_nearest`` and ``oracle``; and when
``python benchmarks/revisit_world.py train-budget`` has run, the toy model fine-tuned with the learned policy among
its training contexts (``trained_all``, ``trained_learned@b``).
Metrics as the revisit benchmark's (latent PSNR, capped at 40 dB): ``revisit_psnr`` on ``long_pan``,
``occluder_band_psnr`` (revisited places the wall hid on the second turn) on ``long_occluder``,
``moving_object_psnr`` on ``long_moving_object``; and per chunk, seconds per denoising step against the history
length.

    python benchmarks/long_rollout.py                 # 4 held-out worlds, benchmarks/results/long_rollout/
    python benchmarks/long_rollout.py --quick --out /tmp/lr   # a smoke run: 1 world, 2 steps, budget 4 only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK / "benchmarks"))

import torch  # noqa: E402
from revisit_world import (  # noqa: E402
    CHUNK,
    EVAL_SEED,
    LATENT,
    QUERY_LAYERS,
    STEPS,
    WORK,
    Evaluator,
    rollout_case,
    rule_predictions,
    run_meta,
)

from memlearner_core import revisit_world as rw  # noqa: E402

OUT = PACK / "benchmarks" / "results" / "long_rollout"
BUDGETS = (2, 4, 8)
BOUNDED = ("recent", "fov", "framepack", "learned")
METRIC = {"long_pan": ("revisit_psnr", "revisit"), "long_occluder": ("occluder_band_psnr", "band"),
          "long_moving_object": ("moving_object_psnr", "shown")}


TRAINED = "query_learned"  # the toy model fine-tuned with the learned policy among its contexts (train-budget)


def configurations(models, budgets=BUDGETS) -> dict:
    """name -> (model, policy, context_frames, query_layers): the toy model's ``all`` unbounded, each bounded
    policy at each budget and the query layers off; with ``TRAINED`` among ``models`` also its ``all`` and
    learned policy (``trained_...``)."""
    out = {"all": ("query", "all", 0, QUERY_LAYERS)}
    out.update({f"{p}@{b}": ("query", p, b, QUERY_LAYERS) for b in budgets for p in BOUNDED})
    out["query_no_context"] = ("query", "all", 0, 0)
    if TRAINED in models:
        out["trained_all"] = (TRAINED, "all", 0, QUERY_LAYERS)
        out.update({f"trained_learned@{b}": (TRAINED, "learned", b, QUERY_LAYERS) for b in budgets})
        out.update({f"trained_{p}@4": (TRAINED, p, 4, QUERY_LAYERS) for p in ("recent", "fov")})
    return out


def measure(ev: Evaluator, worlds: int, steps: int, budgets=BUDGETS) -> dict:
    """Every configuration on every long path of ``worlds`` held-out worlds: error sums per metric, and per chunk
    (history length, seconds per step, frames read)."""
    configs = configurations(ev.models, budgets)
    sums, chunks, began = {}, {}, time.time()
    for wi in range(worlds):
        for path in rw.LONG_PATHS:
            case = rw.long_case(path, EVAL_SEED + wi, LATENT, LATENT)
            metric, label = METRIC[path]
            mask = case.labels[label]
            preds = rule_predictions(case)
            for name, (model, policy, budget, layers) in configs.items():
                print(f"[long] world {wi + 1}/{worlds} {path} {name} ({time.time() - began:.0f}s)", flush=True)
                weights = f"revisit_{model}_query.safetensors" if layers else "none"
                latent, report = rollout_case(ev.server, ev.rollout, ev.models[model], case, wi, steps, policy,
                                              budget, layers, weights, 1, ev.wa)
                preds[name] = ev.wa.wan21_latent_in(latent["samples"][0].float())[:, case.history:]
                if path == "long_pan":
                    for r in json.loads(report):
                        chunks.setdefault(name, []).append((r["first_frame"], r["seconds"] / steps,
                                                            r["context_tokens"] // 16))
            for name, pred in preds.items():
                if not torch.isfinite(pred).all():
                    raise RuntimeError(f"{name} produced a non-finite latent on {path}, world {wi}")
                s = sums.setdefault(name, {}).setdefault(metric, [0.0, 0])
                s[0] += float(rw.squared_error(pred, case)[mask].sum())
                s[1] += int(mask.sum())
    return {"psnr": {n: {m: rw.psnr(*v) for m, v in ms.items()} for n, ms in sums.items()}, "chunks": chunks,
            "seconds": round(time.time() - began, 1)}


def step_growth(chunks: list) -> dict:
    """Median seconds per step at the first and last chunk (over worlds) and their ratio."""
    by_history: dict = {}
    for history, sec, _ in chunks:
        by_history.setdefault(history, []).append(sec)
    first, last = min(by_history), max(by_history)
    a, b = statistics.median(by_history[first]), statistics.median(by_history[last])
    return {"history_first": first, "history_last": last, "step_s_first": round(a, 5), "step_s_last": round(b, 5),
            "last_over_first": round(b / a, 3)}


def computed_step_cost(chunks=(2, 10, 30), budget: int = 8, steps: int = 50) -> list[dict]:
    """Per chunk ``k`` of a Wan2.1-1.3B rollout (81-frame 480x832 chunks: 21 latent frames of 1,560 tokens, 5 query
    layers, cond + uncond, the context cache on), the analytic TFLOPs of one denoising step
    (``memory_cost.step_flops``) with ``all`` unbounded and with ``learned`` at ``budget`` frames, each with its
    once-per-chunk part (the context keys; for ``learned`` also the summaries and their scores) spread over
    ``steps`` steps. Computed, not measured: at toy scale the step time is dominated by overheads."""
    import memory_cost as mc

    from memlearner_core.context_routing import summary_tokens

    shape, (t, h, w) = mc.Shape.of("1.3b"), (21, 60, 104)
    per_frame = (h // 2) * (w // 2)
    rows = []
    for k in chunks:
        history = (k - 1) * t
        every = mc.step_flops(shape, t * per_frame, "query", history * per_frame, 5, True)
        routed = mc.step_flops(shape, t * per_frame, "query", min(budget, history) * per_frame, 5, True,
                               frames=history, summary=summary_tokens(h, w))
        rows.append({"chunk": k, "history_frames": history,
                     "all_tflops": round((every["step"] + every["once"] / steps) / 1e12, 1),
                     f"learned@{budget}_tflops": round((routed["step"] + routed["once"] / steps) / 1e12, 1)})
    return rows


def targets(psnr: dict, growth: dict) -> dict:
    """The targets at a budget of 4 frames, for the learned policy on the toy model and (when trained) on the model
    fine-tuned for it: True, False, or None where a figure is missing."""
    def get(name, metric):
        return psnr.get(name, {}).get(metric)

    checks = {}
    rev, band, mov = "revisit_psnr", "occluder_band_psnr", "moving_object_psnr"
    for prefix in ("", "trained_"):  # each model against its own unbounded all and fov
        learned, unbounded, fov = f"{prefix}learned@4", f"{prefix}all", f"{prefix}fov@4"
        if learned not in psnr and prefix:
            continue
        pairs = {f"{learned} within 1 dB of {unbounded} on revisits": (get(learned, rev), get(unbounded, rev)),
                 f"{learned} above {fov} behind the wall": (get(learned, band), get(fov, band)),
                 f"{learned} above {fov} on moving objects": (get(learned, mov), get(fov, mov))}
        for i, (name, (a, b)) in enumerate(pairs.items()):
            checks[name] = None if a is None or b is None else (a >= b - 1.0 if i == 0 else a > b)
        g = growth.get(learned)
        checks[f"{learned} step at the last chunk <= 1.2x the first"] = None if g is None \
            else g["last_over_first"] <= 1.2
    return checks


def write(out: Path, result: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    growth = {n: step_growth(c) for n, c in result["chunks"].items()}
    computed = computed_step_cost()
    doc = {**meta, **result, "step_growth": growth, "computed_step_cost_1_3b": computed,
           "targets": targets(result["psnr"], growth)}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    metrics = [m for m, _ in METRIC.values()]
    lines = ["# Long rollouts within a fixed context budget (revisit world, 3 turns, 48 latent frames)", "",
             f"`{meta['command']}` on {meta['machine']}, commit {meta['commit']}, {meta['date']}; "
             f"{meta['worlds']} held-out worlds, {meta['steps']} steps, the model: {meta['model']}.", "",
             "| configuration | " + " | ".join(metrics) + " | step s, first chunk | last chunk | last / first |",
             "|---" * (len(metrics) + 4) + "|"]
    for name, row in result["psnr"].items():
        g = growth.get(name)
        cells = [f"{row[m]:.2f}" if row.get(m) is not None else "" for m in metrics]
        cells += [f"{g['step_s_first']:.4f}", f"{g['step_s_last']:.4f}", f"{g['last_over_first']:.2f}"] if g \
            else ["", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (budget 4): " + "; ".join(f"{k}: {'met' if v else 'missed' if v is False else 'not measured'}"
                                                     for k, v in doc["targets"].items()), ""]
    first, last = computed[0], computed[-1]
    lines += ["Step cost at the Wan2.1-1.3B shape, **computed** (`memory_cost.step_flops`: 81-frame 480x832 chunks, "
              "5 query layers, cond + uncond, 50 steps a chunk, the once-per-chunk context keys and scoring spread "
              "over them), TFLOPs per step:", "", "| chunk | history frames | all | learned@8 |", "|---|---|---|---|"]
    lines += [f"| {r['chunk']} | {r['history_frames']} | {r['all_tflops']:,.1f} | {r['learned@8_tflops']:,.1f} |"
              for r in computed]
    lines += ["", f"Chunk {last['chunk']} over chunk {first['chunk']}: all "
              f"{last['all_tflops'] / first['all_tflops']:.2f}x, learned@8 "
              f"{last['learned@8_tflops'] / first['learned@8_tflops']:.3f}x.", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, result, growth)


def _plot(out: Path, result: dict, growth: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    psnr = result["psnr"]
    budgets = sorted({int(n.split("@")[1]) for n in psnr if "@" in n})
    for policy in BOUNDED:
        ys = [psnr.get(f"{policy}@{bu}", {}).get("revisit_psnr") for bu in budgets]
        a.plot(budgets, ys, marker="o", label=policy)
    for name, style in (("all", "--"), ("copy_nearest", ":"), ("query_no_context", "-.")):
        if psnr.get(name, {}).get("revisit_psnr") is not None:
            a.axhline(psnr[name]["revisit_psnr"], ls=style, color="grey", label=f"{name} (unbounded)" if name == "all"
                      else name)
    a.set(xlabel="context budget (frames)", ylabel="revisit PSNR, long_pan (dB)", xticks=budgets)
    a.legend(fontsize=8)
    for name in ("all", "recent@4", "fov@4", "learned@4"):
        pts = sorted(result["chunks"].get(name, []))
        if pts:
            hist = sorted({p[0] for p in pts})
            b.plot(hist, [statistics.median([p[1] for p in pts if p[0] == h]) for h in hist], marker=".", label=name)
    b.set(xlabel="history length (latent frames)", ylabel="seconds per denoising step")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "long_rollout.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=WORK, help="the revisit benchmark's work folder (its models)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worlds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 world, 2 steps, budget 4 only")
    args = ap.parse_args(argv)
    worlds, steps, budgets = (1, 2, (4,)) if args.quick else (args.worlds, STEPS, BUDGETS)
    ev = Evaluator(args.work, steps)
    if "query" not in ev.models:
        raise SystemExit("no query model: the shipped toy model (memlearner_host/revisit_model) is missing")
    result = measure(ev, worlds, steps, budgets)
    meta = {**run_meta("long_rollout.py", argv), "worlds": worlds, "steps": steps, "chunk": CHUNK,
            "model": ev.sources["query"], "trained_model": ev.sources.get(TRAINED)}
    write(args.out, result, meta)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
