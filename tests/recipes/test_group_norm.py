"""GroupNorm: equal to torch.nn.GroupNorm; G = 1 is LayerNorm over (C, H, W) and G = C is InstanceNorm
(the paper's Figure 2); a classifier learns with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import RECIPES, classifier_accuracy, same_forward_and_backward, set_affine
from papertrain.recipes.normalization.group_norm.model import GroupNorm
from papertrain.recipes.normalization.instance_norm.model import InstanceNorm
from papertrain.recipes.normalization.layer_norm.model import LayerNorm

CONFIG = RECIPES / "normalization" / "group_norm" / "tiny.yaml"


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 8, 5, 5), (4, 8, 10)], ids=["images", "sequences"])
def test_equals_torch_groupnorm(groups: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(groups)
    ours, reference = GroupNorm(groups, 8), torch.nn.GroupNorm(groups, 8)
    set_affine(torch.linspace(0.5, 2, 8), torch.linspace(-1, 1, 8), ours, reference)
    x = torch.randn(shape) * 3 + 1
    same_forward_and_backward(ours, reference, x)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)  # the same in evaluation


def test_one_group_is_layernorm_and_one_channel_per_group_is_instancenorm() -> None:
    x = torch.randn(4, 6, 5, 5) * 2 + 3
    no_affine = GroupNorm(1, 6, affine=False)
    torch.testing.assert_close(no_affine(x), LayerNorm((6, 5, 5), elementwise_affine=False)(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(GroupNorm(6, 6, affine=False)(x), InstanceNorm(6)(x), atol=1e-5, rtol=1e-5)


def test_channels_must_divide_into_groups() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 8)


@pytest.mark.slow
def test_a_classifier_with_groupnorm_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.6  # chance is 0.1; measured 0.77-0.83
