"""LayerNorm: equal to torch.nn.LayerNorm (outputs and gradients), independent of the batch, and a
classifier that learns with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import RECIPES, classifier_accuracy, same_forward_and_backward, set_affine
from papertrain.recipes.normalization.layer_norm.model import LayerNorm

CONFIG = RECIPES / "normalization" / "layer_norm" / "tiny.yaml"


@pytest.mark.parametrize("shape,normalized", [((4, 7, 32), 32), ((5, 3, 6, 6), (3, 6, 6)), ((2, 9), (9,))],
                         ids=["tokens", "images", "vectors"])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_torch_layernorm(shape: tuple[int, ...], normalized, affine: bool) -> None:
    torch.manual_seed(0)
    ours, reference = LayerNorm(normalized, elementwise_affine=affine), torch.nn.LayerNorm(normalized, elementwise_affine=affine)
    if affine:
        set_affine(torch.rand(ours.weight.shape) + 0.5, torch.randn(ours.bias.shape), ours, reference)
    same_forward_and_backward(ours, reference, torch.randn(shape) * 4 + 2)
    if affine:
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, atol=1e-4, rtol=1e-4)


def test_each_example_is_normalized_on_its_own_in_training_and_evaluation() -> None:
    norm = LayerNorm(16)
    x = torch.randn(6, 16) * 3
    alone = norm(x[:1])
    assert torch.equal(norm(x)[:1], alone)  # the other examples change nothing
    norm.eval()
    assert torch.equal(norm(x[:1]), alone)  # and evaluation computes the same function


def test_a_wrong_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="LayerNorm"):
        LayerNorm(8)(torch.randn(2, 7))


@pytest.mark.slow
def test_a_classifier_with_layernorm_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.6  # chance is 0.1; measured 0.77-0.83
