"""InstanceNorm: equal to torch.nn.InstanceNorm2d with and without running statistics, in training and
evaluation; each channel of each image is normalized on its own; a classifier learns with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import RECIPES, classifier_accuracy, same_forward_and_backward, set_affine
from papertrain.recipes.normalization.instance_norm.model import InstanceNorm

CONFIG = RECIPES / "normalization" / "instance_norm" / "tiny.yaml"


@pytest.mark.parametrize("settings", [{}, {"affine": True}, {"track_running_stats": True},
                                      {"affine": True, "track_running_stats": True, "momentum": 0.3}],
                         ids=["plain", "affine", "running-stats", "both"])
def test_equals_torch_instancenorm_in_training_and_evaluation(settings: dict) -> None:
    torch.manual_seed(0)
    ours, reference = InstanceNorm(4, **settings), torch.nn.InstanceNorm2d(4, **settings)
    if settings.get("affine"):
        set_affine(torch.tensor([0.5, 1.0, 1.5, 2.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0]), ours, reference)
    for step in range(4):
        same_forward_and_backward(ours, reference, torch.randn(3, 4, 6, 5) * 2 + step)
        if settings.get("track_running_stats"):
            torch.testing.assert_close(ours.running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.running_var, reference.running_var, atol=1e-5, rtol=1e-5)
    ours.eval(), reference.eval()
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_every_channel_of_every_image_has_zero_mean_and_unit_variance() -> None:
    y = InstanceNorm(3)(torch.randn(5, 3, 8, 8) * 7 - 2)
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((2, 3), unbiased=False), torch.ones(5, 3), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_a_classifier_with_instancenorm_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.6  # chance is 0.1; measured 0.77-0.83
