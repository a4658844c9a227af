"""Batch-Channel Normalization: with batch statistics it is torch.nn.BatchNorm2d followed by
torch.nn.GroupNorm (training and evaluation); with estimates it follows Algorithm 1's update, computed
independently, and no gradient flows between images; a classifier learns with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import RECIPES, classifier_accuracy, same_forward_and_backward, set_affine
from papertrain.recipes.normalization.batch_channel_norm.model import BatchChannelNorm

CONFIG = RECIPES / "normalization" / "batch_channel_norm" / "tiny.yaml"


def test_with_batch_statistics_it_is_batchnorm_then_groupnorm() -> None:
    torch.manual_seed(0)
    ours = BatchChannelNorm(8, num_groups=4)
    reference = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.GroupNorm(4, 8))
    set_affine(torch.linspace(0.5, 2, 8), torch.linspace(-1, 1, 8), ours.batch, reference[0])
    set_affine(torch.linspace(2, 0.5, 8), torch.linspace(1, -1, 8), ours.channel, reference[1])
    for step in range(3):
        same_forward_and_backward(ours, reference, torch.randn(6, 8, 5, 5) * 2 + step)
    ours.eval(), reference.eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_estimated_statistics_follow_algorithm_1() -> None:
    """μ̂ ← μ̂ + r(μ_B - μ̂), σ̂² ← σ̂² + r(σ²_B - σ̂²) from each batch, then x̂ = (x - μ̂)/√(σ̂² + ε) and
    channel normalization over groups, all written out here in float64."""
    torch.manual_seed(0)
    rate, eps, groups = 0.2, 1e-5, 2
    norm = BatchChannelNorm(4, num_groups=groups, momentum=rate, estimate=True, eps=eps)
    mean_hat, var_hat = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for step in range(4):
        x = torch.randn(3, 4, 5, 5) * 2 + step
        y = norm(x)
        xd = x.double()
        mean_hat = mean_hat + rate * (xd.mean((0, 2, 3)) - mean_hat)
        var_hat = var_hat + rate * (xd.var((0, 2, 3), unbiased=False) - var_hat)
        x_hat = (xd - mean_hat.view(1, 4, 1, 1)) / (var_hat.view(1, 4, 1, 1) + eps).sqrt()
        grouped = x_hat.reshape(3, groups, -1)
        expected = ((grouped - grouped.mean(-1, keepdim=True))
                    / (grouped.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).view_as(xd)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.batch.estimated_mean.double(), mean_hat, atol=1e-6, rtol=1e-6)


def test_with_estimates_no_gradient_flows_between_images() -> None:
    """Each image's output depends on the others only through the estimates, which are constants."""
    norm = BatchChannelNorm(4, num_groups=2, estimate=True)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    norm(x)[0].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1:].abs().max() == 0


@pytest.mark.slow
def test_a_classifier_with_batch_channel_norm_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.85  # chance is 0.1
