"""The training loop shared by both recipes: the loss falls, a resumed run equals an uninterrupted one, bf16
autocast, and data-parallel processes (accelerate: torch.distributed + DDP) train exactly like one process with
their batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlearner_core.training.checkpointing import TrainCheckpointError
from memlearner_core.training.config import config_from_dict
from memlearner_core.training.distributed import Processes
from memlearner_core.training.trainer import train


class ToyRecipe(torch.nn.Module):
    """Fit y = W x with noisy targets: the noise is drawn from the loop's generator, like the flow target."""

    def __init__(self, noise: float = 0.01):
        super().__init__()
        self.noise = noise
        torch.manual_seed(123)
        self.model = torch.nn.Linear(4, 4)
        self.true = torch.nn.Linear(4, 4).requires_grad_(False)

    def trainable(self):
        return dict(self.model.named_parameters())

    def checkpointed(self):
        return self.trainable()

    def forward(self, item, generator):
        target = self.true(item).detach() + self.noise * torch.randn(item.shape, generator=generator)
        return torch.nn.functional.mse_loss(self.model(item), target)

    def export(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "toy.pt"
        torch.save(self.model.state_dict(), path)
        return [path]


def config(tmp_path, **kw):
    data = dict(recipe="query", data_dir="data", output_dir=str(tmp_path / "run"), model_file="m", vae_file="v",
                steps=30, lr=0.05, checkpoint_every=3, mixed_precision="fp32", weight_decay=0.0)
    data.update(kw)
    return config_from_dict(data, tmp_path)


ITEMS = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def test_loss_falls_over_thirty_steps(tmp_path):
    result = train(config(tmp_path), ToyRecipe(), ITEMS)
    assert result.steps_done == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])
    assert [p.name for p in result.exported] == ["toy.pt"]


def test_resume_after_a_crash_loses_and_repeats_no_step(tmp_path):
    straight = ToyRecipe()
    train(config(tmp_path / "a", steps=10), straight, ITEMS)
    first = ToyRecipe()
    train(config(tmp_path / "b", steps=6), first, ITEMS)  # stops (as if crashed) after the step-6 checkpoint
    resumed = ToyRecipe()
    result = train(config(tmp_path / "b", steps=10), resumed, ITEMS)
    assert result.start_step == 6 and len(result.losses) == 4
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        train(config(tmp_path), ToyRecipe(), [])


def test_a_batch_averages_the_gradients_of_its_items(tmp_path):
    batched = ToyRecipe(noise=0.0)
    train(config(tmp_path / "a", steps=1, batch_size=2), batched, ITEMS)
    by_hand = ToyRecipe(noise=0.0)
    order = torch.randperm(len(ITEMS), generator=torch.Generator().manual_seed(0)).tolist()
    loss = sum(by_hand(ITEMS[i], None) for i in order[:2]) / 2
    loss.backward()
    opt = torch.optim.AdamW(by_hand.parameters(), lr=0.05, weight_decay=0.0)
    opt.step()
    for a, b in zip(batched.model.parameters(), by_hand.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


class AutocastProbe(ToyRecipe):
    """Records, per item, the autocast dtype the loop runs the recipe under (None: no autocast)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, item, generator):
        self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return super().forward(item, generator)


def test_bf16_runs_the_recipe_under_autocast_and_fp32_without(tmp_path):
    """Mixed precision through accelerate, one process switching between settings run by run."""
    for run, (precision, expected) in enumerate((("bf16", torch.bfloat16), ("fp32", None), ("bf16", torch.bfloat16))):
        recipe = AutocastProbe()
        train(config(tmp_path / str(run), steps=2, batch_size=2,
                     mixed_precision=precision), recipe, ITEMS)
        assert recipe.seen == [expected] * 4
        assert all(p.dtype == torch.float32 for p in recipe.model.parameters())  # fp32 master weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    procs = Processes.from_env()
    recipe = ToyRecipe(noise=0.0)
    from pathlib import Path

    result = train(config(Path(folder), steps=6), recipe, ITEMS, processes=procs)
    torch.save({"weights": recipe.model.state_dict(), "exported": [str(p) for p in result.exported]},
               Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_train_like_one_process_with_a_batch_of_two(tmp_path):
    mp.spawn(_data_parallel_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    single = ToyRecipe(noise=0.0)
    train(config(tmp_path / "one", steps=6, batch_size=2), single, ITEMS)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0]["weights"][name], value)
        torch.testing.assert_close(ranks[1]["weights"][name], value)
    assert len(ranks[0]["exported"]) == 1 and ranks[1]["exported"] == []  # only the first process writes
    with pytest.raises(TrainCheckpointError, match="written by 2 process"):
        train(config(tmp_path / "ddp", steps=8), ToyRecipe(), ITEMS)
