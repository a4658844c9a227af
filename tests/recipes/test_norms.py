"""The norms comparison: every normalization builds into the classifier and trains and evaluates, bad
choices are clear errors, and every variant of `papertrain compare norms` is a valid config."""

from __future__ import annotations

import pytest
import torch

from conftest import RECIPES
from papertrain.catalog import discover
from papertrain.compare import load_comparison
from papertrain.errors import PapertrainError
from papertrain.recipes.normalization.norms.model import NORMS, NormConvNet


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("weight_standardization", [False, True], ids=["conv", "ws-conv"])
def test_every_normalization_trains_and_evaluates(norm: str, weight_standardization: bool) -> None:
    torch.manual_seed(0)
    model = NormConvNet(norm=norm, channels=(8, 16, 16), weight_standardization=weight_standardization)
    images, labels = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(images[:1]).shape == (1, 10)  # evaluation works on a single image, whatever the norm


def test_bad_choices_are_clear_errors() -> None:
    with pytest.raises(PapertrainError, match="model.norm='weight'"):
        NormConvNet(norm="weight")
    with pytest.raises(PapertrainError, match="divisible by model.groups=8"):
        NormConvNet(norm="group", channels=(12, 16, 16))
    with pytest.raises(PapertrainError, match="expects images of 1x28x28"):
        NormConvNet()(torch.rand(2, 3, 32, 32))


def test_every_compared_variant_is_a_valid_config() -> None:
    comparison = load_comparison(discover()["norms"], [])
    assert len(comparison.variants) == 7 and comparison.metric == "val/accuracy"
    assert all(v.config == RECIPES / "normalization" / "norms" / "tiny.yaml" for v in comparison.variants)
