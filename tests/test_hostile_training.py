"""``memlearner-train`` on hostile inputs: checkpoints that lie on resume, data files that are no regular files,
output and data folders that are no folder or lead out, a run that diverges, and errors from the OS.

Each is exit 2 and one stderr line ``memlearner-train: ...`` naming the file or key and the fix: never a
traceback, never exit 1, never "trained" with a NaN loss, nothing exported and nothing written outside output_dir.
One short real run (module-scoped) makes the checkpoint every lying case starts from, copied per case.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_cli import random_text, write_videos

from memlearner_core.training.checkpointing import STATE_LIMIT
from memlearner_train.cli import main

import tiny_models

STEP = "step-00000002"  # the shared run's checkpoint (2 steps); each case resumes it for a third


@contextlib.contextmanager
def never_blocks(seconds: int = 120):
    """Fail, instead of hanging the suite, if a FIFO is opened and waited on."""
    def blocked(signum, frame):
        raise AssertionError(f"blocked for {seconds} s (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_file(folder: Path, models_dir: Path, data: Path | str, **override) -> Path:
    """The tiny query run of ``test_train_cli.write_run`` reading ``data`` and writing ``folder/run``; ``override``
    replaces or adds TOML values (written as given)."""
    settings = {"recipe": '"query"', "data_dir": json.dumps(str(data)), "output_dir": '"run"',
                "model_file": json.dumps(str(models_dir / "diffusion_models" / tiny_models.WAN_FILE)),
                "vae_file": json.dumps(str(models_dir / "vae" / tiny_models.VAE_FILE)), "steps": "3",
                "checkpoint_every": "2", "clip_frames": "9", "width": "64", "height": "64", "query_layers": "2",
                "predict_latent_frames": "1", "max_context_multiple": "2", "mixed_precision": '"fp32"',
                "lr": "1e-4", **override}
    path = folder / "run.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@dataclass
class Trained:
    root: Path
    data: Path
    err: str
    warnings: list[str]


@pytest.fixture(scope="module")
def trained(comfy, models_dir, tmp_path_factory) -> Trained:
    """A 2-step run with a checkpoint at step 2, on data that also holds a broken video, a FIFO and a link to
    /dev/null named as videos (all three skipped)."""
    root = tmp_path_factory.mktemp("hostile_training")
    data = root / "data"
    write_videos(data)
    os.mkfifo(data / "fifo.mp4")
    (data / "null.mp4").symlink_to(os.devnull)
    captions = json.loads((data / "captions.json").read_text())
    (data / "captions.json").write_text(json.dumps({**captions, "fifo.mp4": "a pipe", "null.mp4": "nothing"}))
    handler, err = Warnings(), io.StringIO()
    logging.getLogger("memlearner").addHandler(handler)
    try:
        with never_blocks(), contextlib.redirect_stderr(err):
            assert main([str(run_file(root, models_dir, data, steps="2"))], text_fn=random_text) == 0
    finally:
        logging.getLogger("memlearner").removeHandler(handler)
    assert (root / "run" / "checkpoints" / STEP / "state.json").is_file()
    return Trained(root, data, err.getvalue(), handler.lines)


def resume_copy(trained: Trained, tmp_path: Path) -> Path:
    """The shared run folder copied to ``tmp_path/run`` (its latent cache too), without its exports."""
    run = tmp_path / "run"
    shutil.copytree(trained.root / "run", run, symlinks=True)
    shutil.rmtree(run / "export")
    return run


def refused(capsys, rc: int, pattern: str) -> str:
    """Exit 2 and exactly one ``memlearner-train:`` line on stderr, matching ``pattern``, bounded, no traceback."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("memlearner-train:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err and len(lines[0]) < 1100
    return lines[0]


# --- checkpoints that lie on resume ------------------------------------------------------------------------------

def state_edit(edit):
    def damage(ckpt: Path):
        state = json.loads((ckpt / "state.json").read_text())
        edit(state)
        (ckpt / "state.json").write_text(json.dumps(state))
    return damage


def weights_edit(edit):
    def damage(ckpt: Path):
        weights = load_file(str(ckpt / "weights.safetensors"))
        edit(weights)
        save_file(weights, str(ckpt / "weights.safetensors"))
    return damage


def first(weights: dict) -> str:
    return sorted(weights)[0]


def rank(state: dict) -> dict:
    return state["rng"]["ranks"][0]


def other_models_optimizer(ckpt: Path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")


def misshaped_optimizer(ckpt: Path):
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"] = torch.zeros(7)
    torch.save(saved, ckpt / "optimizer.pt")


def replace_with(name: str, make):
    def damage(ckpt: Path):
        (ckpt / name).unlink()
        make(ckpt / name)
    return damage


def huge(path: Path):
    with open(path, "wb") as f:
        f.truncate(STATE_LIMIT + 1)  # sparse: costs no disk


W, S, OPT = r"weights\.safetensors", r"state\.json", r"optimizer\.pt"
CHECKPOINT_CASES = [  # (id, damage, what the line says)
    ("nan-weights", weights_edit(lambda w: w[first(w)].view(-1).__setitem__(0, float("nan"))),
     W + r": tensor .* NaN or infinite.*lower lr"),
    ("inf-weights", weights_edit(lambda w: w[first(w)].view(-1).__setitem__(0, float("inf"))),
     W + ": tensor .* NaN or infinite"),
    ("wrong-shape", weights_edit(lambda w: w.__setitem__(first(w), torch.zeros(3, 5))),
     W + r": tensor .* is torch.float32 \[3, 5\], this run's is"),
    ("missing-tensor", weights_edit(lambda w: w.pop(first(w))), W + " lacks 1 of this run's"),
    ("extra-tensor", weights_edit(lambda w: w.__setitem__("bogus.weight", torch.zeros(2))),
     W + r" holds 1 tensor\(s\) this run does not train \('bogus\.weight'\)"),
    ("garbage-weights", lambda c: (c / "weights.safetensors").write_bytes(b"garbage"), W + " is not a safetensors"),
    ("weights-to-dev-null", replace_with("weights.safetensors", lambda p: p.symlink_to(os.devnull)),
     W + " is not a regular file"),
    ("step-1e9", state_edit(lambda s: s.__setitem__("step", 1e9)), S + ": 'step' must be a whole number"),
    ("step-beyond-folder", state_edit(lambda s: s.__setitem__("step", 10**9)),
     S + f": 'step' is 1000000000, but the folder is {STEP}"),
    ("step-past-the-run", lambda c: (state_edit(lambda s: s.__setitem__("step", 10**9))(c),
                                     c.rename(c.parent / "step-1000000000")),
     r"step-1000000000 is 1000000000 steps in, past this run's steps = 3; raise steps"),
    ("negative-step", state_edit(lambda s: s.__setitem__("step", -1)), S + ": 'step' must be a whole number >= 0"),
    ("text-step", state_edit(lambda s: s.__setitem__("step", "2")), S + ": 'step' must be a whole number"),
    ("no-rng", state_edit(lambda s: s.pop("rng")), S + ": 'rng' .* is missing"),
    ("no-ranks", state_edit(lambda s: s["rng"].pop("ranks")), S + r": rng\.ranks must be a list"),
    ("short-torch-state", state_edit(lambda s: rank(s).__setitem__("torch", [0, 1, 2])),
     S + r": rng\.ranks\[0\]\.torch must be a list of 5056 bytes"),
    ("torch-state-not-bytes", state_edit(lambda s: rank(s).__setitem__("torch", [300] * 5056)),
     S + r": rng\.ranks\[0\]\.torch must be a list of 5056 bytes"),
    ("generator-state-text", state_edit(lambda s: rank(s).__setitem__("generator", "x" * 10**6)),
     S + r": rng\.ranks\[0\]\.generator must be .* got a str of 1000000 characters"),
    ("no-generator-state", state_edit(lambda s: rank(s).pop("generator")), S + r": rng\.ranks\[0\]\.generator"),
    ("python-state-garbage", state_edit(lambda s: rank(s).__setitem__("python", [3, [1, 2], None])),
     S + r": rng\.ranks\[0\]\.python must be Python's random state"),
    ("cuda-state-floats", state_edit(lambda s: rank(s).__setitem__("cuda", [[0.5]])),
     S + r": rng\.ranks\[0\]\.cuda\[0\] must be a list of the bytes"),
    ("negative-position", state_edit(lambda s: rank(s).__setitem__("position", -1)),
     S + r": rng\.ranks\[0\]\.position must be a whole number >= 0"),
    ("order-generator-short", state_edit(lambda s: s["rng"].__setitem__("order_generator", [1])),
     S + r": rng\.order_generator must be a list of 5056 bytes"),
    ("order-of-other-data", state_edit(lambda s: s["rng"].__setitem__("order", [0])),
     S + r": rng\.order is a data order of 1 clip\(s\), this run has 2"),
    ("two-processes", state_edit(lambda s: s["rng"]["ranks"].append(rank(s))),
     f"{STEP} was written by 2 process\\(es\\); resume it with the same number"),
    ("state-not-json", lambda c: (c / "state.json").write_text("{not json"), S + r" is not valid JSON"),
    ("state-not-object", lambda c: (c / "state.json").write_text("[1, 2]"), S + " is not a training checkpoint"),
    ("state-not-utf8", lambda c: (c / "state.json").write_bytes(b'{"step": "\xff"}'), S + " is not UTF-8"),
    ("state-nested-deep", lambda c: (c / "state.json").write_text("[" * 100_000 + "]" * 100_000),
     S + " is nested too deeply"),
    ("state-huge", lambda c: huge(c / "state.json"), S + f" is {STATE_LIMIT + 1} bytes"),
    ("state-fifo", replace_with("state.json", os.mkfifo), S + " is not a regular file"),
    ("optimizer-garbage", lambda c: (c / "optimizer.pt").write_bytes(b"\x80\x04garbage" * 100),
     OPT + " is not an optimizer state saved by torch.save"),
    ("optimizer-of-another-model", other_models_optimizer, OPT + r" is the optimizer state of another model: 2 param"),
    ("optimizer-misshaped", misshaped_optimizer, OPT + r": 'exp_avg' of .* is torch.float32 \[7\], the parameter is"),
    ("optimizer-missing", lambda c: (c / "optimizer.pt").unlink(), "missing optimizer.pt"),
]


@pytest.mark.parametrize("damage, message", [pytest.param(d, m, id=i) for i, d, m in CHECKPOINT_CASES])
def test_a_lying_checkpoint_is_refused_in_one_line(trained, models_dir, tmp_path, capsys, damage, message):
    run = resume_copy(trained, tmp_path)
    damage(run / "checkpoints" / STEP)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    with never_blocks():
        rc = main([str(run_file(tmp_path, models_dir, trained.data))], text_fn=random_text)
    line = refused(capsys, rc, message)
    assert re.search(r"delete|resume|raise steps", line)  # the fix
    assert not (run / "export").exists()  # nothing exported
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints  # no step trained


# --- data files that are no regular files ---------------------------------------------------------------------

def test_videos_that_are_no_regular_files_are_skipped_with_a_warning(trained):
    """As the broken video is (test_train_command_skips_the_broken_video_and_exports_loadable_files): a FIFO and a
    link to /dev/null among the videos are skipped, never opened (a FIFO would block), and named."""
    assert "2 clips, 3 skipped" in trained.err
    for name in ("fifo.mp4", "null.mp4"):
        assert any(name in w and "not a regular file" in w for w in trained.warnings), trained.warnings


# --- paths that are no folder, lead out, loop or cannot be read ------------------------------------------------

def output_is_a_file(t: Path, trained, monkeypatch):
    (t / "run").write_text("not a folder")


def output_is_dev_null(t: Path, trained, monkeypatch):
    (t / "run").symlink_to(os.devnull)


def output_under_a_file(t: Path, trained, monkeypatch):
    (t / "afile").write_text("")
    return {"output_dir": '"afile/run"'}


def output_loops(t: Path, trained, monkeypatch):
    (t / "run").symlink_to("run2")
    (t / "run2").symlink_to("run")


def outside(t: Path) -> Path:
    (t / "outside").mkdir(exist_ok=True)
    return t / "outside"


def checkpoints_lead_out(t: Path, trained, monkeypatch):
    run = resume_copy(trained, t)
    shutil.move(run / "checkpoints", outside(t) / "checkpoints")
    (run / "checkpoints").symlink_to(outside(t) / "checkpoints")


def export_leads_out_by_dot_dot(t: Path, trained, monkeypatch):
    outside(t)
    resume_copy(trained, t)
    (t / "run" / "export").symlink_to("../outside")


def export_file_is_a_link(t: Path, trained, monkeypatch):
    (outside(t) / "victim").write_text("keep me")
    (t / "run" / "export").mkdir(parents=True)
    (t / "run" / "export" / "memlearner_wan21.safetensors").symlink_to(outside(t) / "victim")


def cache_leads_out(t: Path, trained, monkeypatch):
    run = resume_copy(trained, t)
    shutil.move(run / "latent_cache", outside(t) / "latent_cache")
    (run / "latent_cache").symlink_to(outside(t) / "latent_cache")


def step_folder_is_a_link(t: Path, trained, monkeypatch):
    run = resume_copy(trained, t)
    shutil.move(run / "checkpoints" / STEP, outside(t) / STEP)
    (run / "checkpoints" / STEP).symlink_to(outside(t) / STEP)


def data_loop(t: Path, trained, monkeypatch, absolute: bool = False):
    (t / "a").symlink_to("b")
    (t / "b").symlink_to("a")
    return {"data_dir": json.dumps(str(t / "a") if absolute else "a")}


def data_is_a_file(t: Path, trained, monkeypatch):
    (t / "data.mp4").write_text("")
    return {"data_dir": '"data.mp4"'}


def data_unreadable(t: Path, trained, monkeypatch):
    locked = t / "locked"
    locked.mkdir()
    locked.chmod(0)
    if os.geteuid() == 0:  # root lists a mode-0 folder: have the OS refuse it as it refuses anyone else
        listdir = os.listdir

        def refusing(path="."):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return listdir(path)

        monkeypatch.setattr(os, "listdir", refusing)
    return {"data_dir": '"locked"'}


def one_video(t: Path, trained, poses) -> dict:
    """A data folder of one captioned video whose poses file ``poses(path)`` makes."""
    data = t / "data"
    data.mkdir()
    shutil.copy(trained.data / "a.mp4", data / "a.mp4")
    (data / "a.txt").write_text("a walk")
    poses(data / "a.poses.json")
    return {"data_dir": '"data"'}


def only_pipes_as_videos(t: Path, trained, monkeypatch):
    data = t / "data"
    data.mkdir()
    os.mkfifo(data / "fifo.mp4")
    (data / "null.mp4").symlink_to(os.devnull)
    (data / "captions.json").write_text(json.dumps({"fifo.mp4": "a pipe", "null.mp4": "nothing"}))
    return {"data_dir": '"data"'}


def a_fifo_latent(t: Path, trained, monkeypatch):
    (t / "data").mkdir()
    os.mkfifo(t / "data" / "clip.safetensors")
    return {"data_dir": '"data"', "data_format": '"latents"'}


def self_link(path: Path):
    path.symlink_to(path.name)


PATH_CASES = [  # (id, setup(tmp_path, trained, monkeypatch) -> TOML overrides, what the line says)
    ("output-dir-is-a-file", output_is_a_file, r"output_dir \S*/run is a file .*not a folder; point output_dir"),
    ("output-dir-is-dev-null", output_is_dev_null, r"output_dir /dev/null is a file \(or FIFO or device\)"),
    ("output-dir-nul", lambda t, tr, m: {"output_dir": r'"run\u0000x"'}, r"'output_dir' holds a NUL"),
    ("output-dir-under-a-file", output_under_a_file, r"output_dir \S*afile/run cannot be made: \S*afile is a file"),
    ("output-dir-loop", output_loops, r"'output_dir' \S*run is a loop of symbolic links"),
    ("checkpoints-lead-out", checkpoints_lead_out, r"output_dir \S*/run: checkpoints leads outside output_dir"),
    ("export-leads-out-by-dot-dot", export_leads_out_by_dot_dot, r"output_dir \S*/run: export leads outside"),
    ("export-file-is-a-link", export_file_is_a_link, r"export/memlearner_wan21\.safetensors is a link"),
    ("cache-leads-out", cache_leads_out, r"output_dir \S*/run: latent_cache leads outside output_dir"),
    ("step-folder-is-a-link", step_folder_is_a_link, rf"checkpoints/{STEP} is a link; a checkpoint must be a folder"),
    ("data-dir-loop", data_loop, r"'data_dir' \S*a is a loop of symbolic links"),
    ("data-dir-loop-absolute", lambda t, tr, m: data_loop(t, tr, m, absolute=True),
     r"data_dir \S*/a is a loop of symbolic links"),
    ("data-dir-is-a-file", data_is_a_file, r"data_dir \S*data\.mp4 is not a folder"),
    ("data-dir-unreadable", data_unreadable, r"data_dir \S*locked cannot be read \(Permission denied\)"),
    ("poses-fifo", lambda t, tr, m: one_video(t, tr, os.mkfifo), r"poses file \S*a\.poses\.json is not a regular file"),
    ("poses-dev-null", lambda t, tr, m: one_video(t, tr, lambda p: p.symlink_to(os.devnull)),
     r"poses file \S*a\.poses\.json is not a regular file"),
    ("poses-folder", lambda t, tr, m: one_video(t, tr, Path.mkdir), r"poses file \S*a\.poses\.json is not a regular"),
    ("poses-loop", lambda t, tr, m: one_video(t, tr, self_link), r"poses file \S*a\.poses\.json is a loop of symbolic"),
    ("only-pipes-as-videos", only_pipes_as_videos,
     r"no training data: every clip was skipped \(fifo\.mp4: not a regular file.*null\.mp4: not a regular file"),
    ("a-fifo-latent", a_fifo_latent, r"no training data: every clip was skipped \(clip\.safetensors: not a regular"),
]


@pytest.mark.parametrize("setup, message", [pytest.param(s, m, id=i) for i, s, m in PATH_CASES])
def test_a_bad_path_is_refused_in_one_line(trained, models_dir, tmp_path, capsys, monkeypatch, setup, message):
    overrides = setup(tmp_path, trained, monkeypatch) or {}
    before = snapshot(tmp_path / "outside")
    with never_blocks():
        rc = main([str(run_file(tmp_path, models_dir, trained.data, **overrides))], text_fn=random_text)
    refused(capsys, rc, message)
    assert snapshot(tmp_path / "outside") == before  # nothing written outside output_dir


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


# --- a run that diverges ----------------------------------------------------------------------------------------

def test_a_run_whose_loss_is_not_finite_stops_naming_the_step(trained, models_dir, tmp_path, capsys):
    run = resume_copy(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")  # a fresh run (the cached latents kept)
    with never_blocks():
        rc = main([str(run_file(tmp_path, models_dir, trained.data, lr="1e30", checkpoint_every="5"))],
                  text_fn=random_text)
    refused(capsys, rc, r"training diverged at step [23]: the (loss is (nan|inf)|gradients are not finite).*"
                        r"Lower lr \(now 1e\+30")
    assert not (run / "export").exists() and not (run / "checkpoints").exists()


# --- what the OS or a parser raises --------------------------------------------------------------------------

@pytest.mark.parametrize("error, message", [
    pytest.param(OSError(errno.ENOSPC, "No space left on device", "/r/run/checkpoints/x/optimizer.pt"),
                 r": /r/run/checkpoints/x/optimizer\.pt: No space left on device; check", id="os-error"),
    pytest.param(PermissionError(errno.EACCES, "Permission denied", "/r/run"), r"/r/run: Permission denied",
                 id="permission-error"),
    pytest.param(RecursionError("maximum recursion depth exceeded"), r"nested too deeply to read", id="recursion"),
    pytest.param(json.JSONDecodeError("Expecting value", "x" * 10**7, 0), r"Expecting value", id="json-error"),
    pytest.param(ValueError("line one\nline two " + "x" * 10**7), r"line one line two x+\.\.\. \(\d+ characters\)$",
                 id="huge-multiline-message"),
])
def test_an_os_or_parser_error_is_one_bounded_line(tmp_path, capsys, monkeypatch, error, message):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr("memlearner_core.training.trainer.preflight", fails)
    rc = main([str(run_file(tmp_path, Path("/m"), tmp_path))])
    refused(capsys, rc, message)
