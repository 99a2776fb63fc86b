"""The training loop shared by both recipes: the loss falls, a resumed run equals an uninterrupted one."""

import torch

from memlearner_core.training.config import config_from_dict
from memlearner_core.training.trainer import train


class ToyRecipe:
    """Fit y = W x with noisy targets: the noise is drawn from the loop's generator, like the flow target."""

    def __init__(self):
        torch.manual_seed(123)
        self.model = torch.nn.Linear(4, 4)
        self.true = torch.nn.Linear(4, 4)

    def trainable(self):
        return dict(self.model.named_parameters())

    def loss(self, item, generator):
        target = self.true(item).detach() + 0.01 * torch.randn(item.shape, generator=generator)
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
    import pytest

    with pytest.raises(ValueError, match="no training data"):
        train(config(tmp_path), ToyRecipe(), [])
