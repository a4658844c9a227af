"""Fuzzy Tiling Activations: the paper's definition computed elementwise, the hard tiling at η = 0, the
sparsity bound ⌊2η/δ⌋ + 2, where gradients exist, and a GPT with FTA feed-forward blocks that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import RECIPES, SMALL_GPT, learns
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.activations.fta.model import FTA, FTAFeedForward, fta_gpt, fuzzy_tiling, max_nonzero

CONFIG = RECIPES / "activations" / "fta" / "tiny.yaml"


def paper_fta(z: float, lower: float, upper: float, delta: float, eta: float) -> list[float]:
    """φ_η(z) from the paper's equations, one scalar and one bin at a time, in Python floats."""
    def indicator(a: float) -> float:  # I_+(a)
        return 1.0 if a > 0 else 0.0

    out = []
    for i in range(round((upper - lower) / delta)):
        c = lower + i * delta
        x = max(c - z, 0.0) + max(z - delta - c, 0.0)
        out.append(1.0 - (indicator(eta - x) * x + indicator(x - eta)))  # 1 - I_{η,+}(x)
    return out


@pytest.mark.parametrize("lower, upper, delta", [(-2.0, 2.0, 0.5), (-1.0, 1.0, 0.2), (0.0, 3.0, 0.75)])
@pytest.mark.parametrize("eta", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_fta_equals_the_papers_definition_elementwise(lower: float, upper: float, delta: float, eta: float) -> None:
    z = torch.empty(7, 9, dtype=torch.float64).uniform_(lower - 1.0, upper + 1.0)  # also outside [l, u]
    ours = FTA(lower, upper, delta, eta)(z)  # [7, 9·k]
    k = round((upper - lower) / delta)
    assert ours.shape == (7, 9 * k)
    expected = torch.tensor([[paper_fta(float(v), lower, upper, delta, eta) for v in row] for row in z],
                            dtype=torch.float64).flatten(1)  # unit-major: each unit's k bins side by side
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.25, 0.5, 0.8])
def test_the_hand_written_derivative_equals_autograd_through_the_definition(eta: float) -> None:
    """FTA's fast path (its own backward) against autograd through the paper's formula, and finite differences."""
    z = torch.empty(6, 40, dtype=torch.float64).uniform_(-2.5, 2.5).requires_grad_()
    upstream = torch.randn(6, 40 * 8, dtype=torch.float64)
    fast = FTA(-2.0, 2.0, 0.5, eta)(z)
    definition = fuzzy_tiling(z, -2.0, 0.5, eta, 8).flatten(-2)
    torch.testing.assert_close(fast, definition, rtol=0, atol=1e-12)
    (ours,) = torch.autograd.grad((fast * upstream).sum(), z)
    (reference,) = torch.autograd.grad((definition * upstream).sum(), z)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(FTA(-2.0, 2.0, 0.5, eta), (z[:2, :10].detach().requires_grad_(),))


def test_eta_zero_is_the_hard_tiling() -> None:
    """η = 0: a one-hot vector marking the bin ⌊(z - l)/δ⌋ (z inside [l, u], off the bin edges)."""
    lower, upper, delta = -2.0, 2.0, 0.25
    z = torch.empty(5000, dtype=torch.float64).uniform_(lower, upper)
    z = z[((z - lower) / delta - ((z - lower) / delta).round()).abs() > 1e-9]  # off the edges
    phi = FTA(lower, upper, delta, eta=0.0)(z[:, None])  # [n, k]
    assert torch.equal(phi.sum(dim=1), torch.ones(len(z), dtype=torch.float64))
    assert torch.equal(phi.argmax(dim=1), ((z - lower) / delta).floor().long())
    assert set(phi.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("delta, eta", [(0.5, 0.5), (0.5, 0.25), (0.5, 0.375), (0.25, 0.625), (0.25, 0.0625),
                                        (0.5, 0.0)])
def test_at_most_floor_two_eta_over_delta_plus_two_nonzeros_and_the_bound_is_attained(delta: float, eta: float
                                                                                     ) -> None:
    """‖φ_η(z)‖₀ ≤ ⌊2η/δ⌋ + 2 for every z, ≤ ⌈2η/δ⌉ + 1 for almost every z; both attained. (Dyadic δ and η,
    so that the z built to sit at distance exactly η from a bin is exact in floating point.)"""
    lower, upper = -2.0, 2.0
    fta = FTA(lower, upper, delta, eta)
    z = torch.empty(20_000, dtype=torch.float64).uniform_(lower, upper)
    nonzero = (fta(z[:, None]) != 0).sum(dim=1)
    assert int(nonzero.max()) == math.ceil(2 * eta / delta) + 1  # almost every z: an open interval's count
    bound = max_nonzero(delta, eta)
    assert bound == math.floor(2 * eta / delta) + 2
    # z = c_3 + δ + η sits at distance exactly η from bin 3 (on an edge when η = 0): all of
    # c_3, c_3 + δ, ..., c_3 + δ + 2η are lit
    exact = torch.tensor([[lower + 4 * delta + eta]], dtype=torch.float64)
    assert int((fta(exact) != 0).sum()) == bound
    outside = torch.empty(2000, 1, dtype=torch.float64).uniform_(upper + eta + 1e-9, upper + 3)
    assert (fta(outside) == 0).all()  # beyond the range and its fringe nothing is lit


@pytest.mark.parametrize("delta, eta", [(0.5, 0.1), (0.5, 0.2), (0.5, 0.25), (0.5, 0.5), (0.4, 0.0)])
def test_a_fraction_min_one_two_eta_over_delta_of_inputs_gets_a_gradient(delta: float, eta: float) -> None:
    """∂φ/∂z is nonzero iff z lies within η of an edge of its own bin: a fraction min(1, 2η/δ) of the inputs
    (inside [l + δ, u - δ]: the outermost bins have no neighbour beyond the range to lend a gradient)."""
    z = torch.empty(20_000, dtype=torch.float64).uniform_(-2.0 + delta, 2.0 - delta).requires_grad_()
    phi = FTA(-2.0, 2.0, delta, eta)(z[:, None])  # [n, k]
    has_gradient = torch.zeros(len(z), dtype=torch.bool)
    for i in range(phi.shape[1]):  # d φ_i / d z per bin (each z only touches its own row)
        (grad,) = torch.autograd.grad(phi[:, i].sum(), z, retain_graph=True)
        assert set(grad.unique().tolist()) <= {-1.0, 0.0, 1.0}
        has_gradient |= grad != 0
    fraction = float(has_gradient.double().mean())
    assert abs(fraction - min(1.0, 2 * eta / delta)) < 0.015, fraction
    if eta > 0:  # and where: exactly the inputs within η of their bin's edges
        offset = torch.remainder(z.detach() + 2.0, delta)
        near_edge = torch.minimum(offset, delta - offset) < eta
        assert (has_gradient == near_edge).double().mean() > 0.999


def test_the_feed_forward_block_widens_by_k_and_matches_gelus_size() -> None:
    ffn = FTAFeedForward(d_model=16, d_ff=6, lower=-1.0, upper=1.0, delta=0.25, eta=0.25)
    assert ffn.linear2.in_features == 6 * 8
    assert ffn(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    tiny = load_config(CONFIG).tree["model"]
    sizes = {name: sum(p.numel() for p in fta_gpt(65, 128, activation=name, d_ff=d_ff).parameters())
             for name, d_ff in (("fta", tiny["d_ff"]), ("gelu", 512))}
    assert abs(sizes["fta"] / sizes["gelu"] - 1) < 0.001, sizes  # the comparison in the README is fair


def test_bad_tilings_are_clear_errors() -> None:
    with pytest.raises(PapertrainError, match="do not tile"):
        FTA(-1.0, 1.0, 0.3, 0.1)
    with pytest.raises(PapertrainError, match="eta=-0.1"):
        FTA(-1.0, 1.0, 0.5, -0.1)
    with pytest.raises(PapertrainError, match="lower < upper"):
        FTA(1.0, -1.0, 0.5, 0.1)


def test_a_gpt_with_fta_feed_forward_learns_shakespeare(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_GPT, "model.d_ff=32", "trainer.max_steps=250", "trainer.batch_size=16",
                                  "trainer.eval_batches=8", "trainer.threads=1"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65) and trained < 2.8
