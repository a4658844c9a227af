"""Weight Standardization: the convolution uses Ŵ = (W - μ)/σ per filter (eq. 5-7, computed independently in
float64), its gradient is the standardization's (gradcheck), scaling or shifting a filter changes nothing,
and GroupNorm + WS learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPES, classifier_accuracy
from papertrain.recipes.normalization.weight_standardization.model import WSConv2d, standardize

CONFIG = RECIPES / "normalization" / "weight_standardization" / "tiny.yaml"


def paper_standardized(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 5-7 element by element, in float64: each output channel i over its I = C_in·k·k inputs j."""
    w = weight.double()
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        values = w[i].flatten().tolist()
        mean = sum(values) / len(values)
        sigma = (sum((v - mean) ** 2 for v in values) / len(values) + eps) ** 0.5
        out[i] = (w[i] - mean) / sigma
    return out


def test_the_convolution_uses_the_papers_standardized_weights() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1, eps=1e-5)
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x.double(), paper_standardized(conv.weight.detach(), 1e-5), conv.bias.double(), padding=1)
    torch.testing.assert_close(conv(x).double(), expected, atol=1e-5, rtol=1e-5)
    rows = standardize(conv.weight, 1e-12).flatten(1)  # (with ε = 1e-5 the variance is σ²/(σ² + ε), a bit under 1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_gradients_flow_through_the_standardization() -> None:
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: standardize(w, 1e-5), (weight,))


def test_scaling_or_shifting_a_filter_changes_nothing() -> None:
    """Exact as ε → 0 (ε only keeps a constant filter from dividing by zero)."""
    torch.manual_seed(1)
    conv = WSConv2d(3, 4, 3, bias=False, eps=1e-12)
    x = torch.randn(2, 3, 7, 7)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([3.0, 0.5, 10.0, 1.0]).view(4, 1, 1, 1)).add_(torch.tensor([1.0, -2.0, 0.0, 5.0]).view(4, 1, 1, 1))
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_groupnorm_with_weight_standardization_learns_mnist(tmp_path: Path) -> None:
    assert classifier_accuracy(CONFIG, tmp_path / "run") > 0.85  # chance is 0.1
