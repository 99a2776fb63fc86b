"""``memlearner-train``: a folder of captioned videos in, files the nodes load out."""

import json
import os
import shutil

import torch

from memlearner_core.training.config import load_config
from memlearner_train.cli import main

import tiny_models


def random_text(caption):
    g = torch.Generator().manual_seed(sum(map(ord, caption)))
    return torch.randn(1, 8, 4096, generator=g)


def write_videos(data, frames=12, size=64):
    data.mkdir(exist_ok=True)
    captions = {"a.mp4": "a walk through a courtyard", "b.mp4": "waves at sunset", "broken.mp4": "unreadable"}
    for i, name in enumerate(["a.mp4", "b.mp4"]):
        tiny_models.write_video(data / name, i, frames=frames, size=size)
    (data / "broken.mp4").write_bytes(b"not a video")
    (data / "captions.json").write_text(json.dumps(captions))


def write_config(path, models_dir, recipe: str, settings: str):
    """A run file for ``recipe`` on the tiny models, reading ``data/`` and writing ``run/``, plus ``settings``."""
    path.write_text(f'''recipe = "{recipe}"
data_dir = "data"
output_dir = "run"
model_file = "{models_dir / 'diffusion_models' / tiny_models.WAN_FILE}"
vae_file = "{models_dir / 'vae' / tiny_models.VAE_FILE}"
''' + settings)
    return path


def write_run(tmp_path, models_dir, steps=3):
    write_videos(tmp_path / "data")
    return write_config(tmp_path / "run.toml", models_dir, "query", f'''steps = {steps}
checkpoint_every = 2
clip_frames = 9
width = 64
height = 64
query_layers = 2
predict_latent_frames = 1
max_context_multiple = 2
mixed_precision = "fp32"
lr = 1e-4
''')


def test_train_command_skips_the_broken_video_and_exports_loadable_files(comfy, models_dir, tmp_path, capsys):
    cfg = write_run(tmp_path, models_dir)
    assert main([str(cfg)], text_fn=random_text) == 0
    out = capsys.readouterr()
    assert "2 clips, 1 skipped" in out.err
    exported = [p for p in out.out.splitlines() if p.endswith(".safetensors")]
    assert [p.rsplit("/", 1)[-1] for p in exported] == ["memlearner_wan21.safetensors", "memlearner_query.safetensors"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003").is_dir()


def test_train_command_trains_an_encoder_that_load_memory_encoder_reads(comfy, models_dir, tmp_path, capsys):
    write_videos(tmp_path / "data", frames=49, size=128)  # the tiny encoder's convolutions need 13 latent frames
    encoder_file = models_dir / "memory_encoders" / tiny_models.ENCODER_FILE
    cfg = write_config(tmp_path / "enc.toml", models_dir, "encoder", f'''encoder_file = "{encoder_file}"
steps = 2
clip_frames = 49
width = 128
height = 128
mixed_precision = "fp32"
''')
    assert main([str(cfg)], text_fn=random_text) == 0
    out = capsys.readouterr()
    assert "2 clips, 1 skipped" in out.err
    (exported,) = [p for p in out.out.splitlines() if p.endswith(".safetensors")]
    assert exported.endswith("memlearner_encoder.safetensors")
    folder = comfy.folder_paths.get_folder_paths("memory_encoders")[0]
    shutil.copy(exported, os.path.join(folder, "cli_encoder.safetensors"))
    try:
        enc = comfy.run("MemLearnerLoadMemoryEncoder", encoder_name="cli_encoder.safetensors", dtype="fp32")[0]
        assert enc.model.cfg.width == tiny_models.TINY_WAN["dim"]
    finally:
        os.remove(os.path.join(folder, "cli_encoder.safetensors"))


def test_a_longer_run_resumes_from_the_checkpoint(comfy, models_dir, tmp_path, capsys):
    main([str(write_run(tmp_path, models_dir, steps=2))], text_fn=random_text)
    assert main([str(write_run(tmp_path, models_dir, steps=4))], text_fn=random_text) == 0
    assert "trained 4 steps (from 2)" in capsys.readouterr().out


def test_example_config_loads(tmp_path, capsys):
    assert main(["--example", "query"]) == 0
    path = tmp_path / "q.toml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path).recipe == "query"


def test_a_bad_config_is_exit_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('recipe = "query"\ndata_dir = "d"\noutput_dir = "o"\nmodel_file = "m"\nvae_file = "v"\nstepz = 3\n')
    assert main([str(path)]) == 2
    assert "stepz" in capsys.readouterr().err
