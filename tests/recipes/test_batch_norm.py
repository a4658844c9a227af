"""BatchNorm: equal to torch.nn.BatchNorm in training and evaluation (outputs, gradients and running
statistics), global-batch statistics on two ranks, and a classifier that learns with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import RECIPES, classifier_accuracy, same_forward_and_backward, set_affine
from multiprocess import run_ranks
from papertrain.recipes.normalization.batch_norm.model import BatchNorm

CONFIG = RECIPES / "normalization" / "batch_norm" / "tiny.yaml"


def reference_for(x: torch.Tensor, **settings) -> torch.nn.Module:
    return (torch.nn.BatchNorm1d if x.dim() in (2, 3) else torch.nn.BatchNorm2d)(x.shape[1], **settings)


@pytest.mark.parametrize("shape", [(16, 5), (8, 4, 7), (6, 3, 5, 5)], ids=["features", "sequence", "images"])
@pytest.mark.parametrize("settings", [{}, {"affine": False}, {"momentum": 0.3, "eps": 1e-3}],
                         ids=["default", "no-affine", "other"])
def test_equals_torch_batchnorm_in_training_and_evaluation(shape: tuple[int, ...], settings: dict) -> None:
    torch.manual_seed(0)
    ours, reference = BatchNorm(shape[1], **settings), reference_for(torch.empty(shape), **settings)
    if settings.get("affine", True):
        set_affine(torch.linspace(0.5, 2.0, shape[1]), torch.linspace(-1.0, 1.0, shape[1]), ours, reference)
    for step in range(5):  # several updates of the running statistics
        same_forward_and_backward(ours, reference, torch.randn(shape) * 3 + step)
        torch.testing.assert_close(ours.running_mean, reference.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, reference.running_var, atol=1e-5, rtol=1e-5)
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 5
    if settings.get("affine", True):
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, atol=1e-4, rtol=1e-4)
    ours.eval(), reference.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)  # population statistics


def test_without_running_statistics_evaluation_uses_the_batch() -> None:
    x = torch.randn(10, 3, 4, 4) * 2 + 1
    ours, reference = BatchNorm(3, track_running_stats=False).eval(), torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_output_is_normalized_per_channel_over_batch_and_positions() -> None:
    y = BatchNorm(4)(torch.randn(32, 4, 6, 6) * torch.tensor([1.0, 5.0, 0.1, 10.0]).view(1, 4, 1, 1) + 3)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def _half_batch(folder: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 2 + 1  # the same global batch on every rank; each takes its half
    upstream = torch.randn(8, 3, 5, 5)
    norm = BatchNorm(3)
    mine = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    y = norm(mine)
    (y * upstream[rank * 4:(rank + 1) * 4]).sum().backward()
    torch.save({"y": y.detach(), "grad": mine.grad, "running_var": norm.running_var, "weight_grad": norm.weight.grad},
               os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_normalize_with_the_global_batch(tmp_path: Path) -> None:
    """Each rank holds half the batch; outputs, input gradients and running statistics equal one process
    with the whole batch (the weight gradient is each rank's share: DDP sums them)."""
    run_ranks(2, _half_batch, str(tmp_path))
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 5, 5) * 2 + 1).requires_grad_()
    upstream = torch.randn(8, 3, 5, 5)
    norm = BatchNorm(3)
    y = norm(x)
    (y * upstream).sum().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["running_var"], norm.running_var, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], norm.weight.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_a_classifier_with_batchnorm_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.85  # chance is 0.1
