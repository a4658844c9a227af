"""AdaBelief: the paper's update equations, written out independently in float64, give the same
trajectories; a gradient that matches its prediction gets a large step and a noisy one a small step
(the "belief"), where Adam's step does not care; checkpointable state; a GPT that learns with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, learns
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.optim.adabelief.model import AdaBelief
from papertrain.recipes.optim.adam.model import Adam

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "optim" / "adabelief" / "tiny.yaml"


def objective(theta: torch.Tensor, data: torch.Generator) -> torch.Tensor:
    """A small, non-convex, noisy objective of a flat float64 parameter vector (8x5 weights, 8 biases)."""
    weight, bias = theta[:40].view(8, 5), theta[40:]
    x = torch.randn(16, 5, generator=data, dtype=torch.float64)
    target = torch.randn(16, 8, generator=data, dtype=torch.float64)
    return (torch.tanh(x @ weight.T + bias) - target).pow(2).mean() + 0.01 * weight.pow(4).sum()


def start() -> torch.Tensor:
    return torch.randn(48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def ours(steps: int = 100, **settings) -> list[torch.Tensor]:
    theta = torch.nn.Parameter(start())
    optimizer = AdaBelief([theta], **settings)
    data = torch.Generator().manual_seed(1)
    path = []
    for _ in range(steps):
        optimizer.zero_grad()
        objective(theta, data).backward()
        optimizer.step()
        path.append(theta.detach().clone())
    return path


def paper(steps: int = 100, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-16,
          weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
          rectify: bool = False) -> list[torch.Tensor]:
    """Algorithm 2 of the paper, line by line, in float64 (plus the options as the paper describes them)."""
    beta1, beta2 = betas
    theta = start()
    m, s, s_max = torch.zeros(48, dtype=torch.float64), torch.zeros(48, dtype=torch.float64), None
    data = torch.Generator().manual_seed(1)
    path = []
    for t in range(1, steps + 1):
        point = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(point, data), point)
        if decoupled_weight_decay:
            theta = theta - lr * weight_decay * theta
        else:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        s = beta2 * s + (1 - beta2) * (g - m) ** 2 + eps
        s_used = s
        if amsgrad:
            s_max = s if s_max is None else torch.maximum(s_max, s)
            s_used = s_max
        m_hat = m / (1 - beta1**t)
        s_hat = s_used / (1 - beta2**t)
        step = lr * m_hat / (torch.sqrt(s_hat) + eps)
        if rectify:  # RAdam, §4.2: ρ_∞, ρ_t and r_t
            rho_inf = 2 / (1 - beta2) - 1
            rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            if rho_t > 5:
                step = step * math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            else:
                step = lr * m_hat
        theta = theta - step
        path.append(theta.clone())
    return path


@pytest.mark.parametrize("settings", [
    {}, {"lr": 1e-2, "eps": 1e-12}, {"weight_decay": 0.05},
    {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}, {"amsgrad": True}, {"rectify": True},
    {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-8, "amsgrad": True, "rectify": True},
], ids=["default", "larger-eps", "l2", "decoupled", "amsgrad", "rectify", "everything"])
def test_trajectory_equals_the_papers_equations_in_float64_for_100_steps(settings: dict) -> None:
    difference = max((a - b).abs().max().item() for a, b in zip(ours(**settings), paper(**settings)))
    assert difference <= 1e-9


def last_step(optimizer_class, gradients: torch.Tensor, **settings) -> torch.Tensor:
    """|Δθ| of each coordinate, averaged over the last half of the steps, given the gradient sequence [T, n]."""
    theta = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=torch.float64))
    optimizer = optimizer_class([theta], **settings)
    moves = []
    for g in gradients:
        before = theta.detach().clone()
        theta.grad = g.clone()
        optimizer.step()
        moves.append((theta.detach() - before).abs())
    return torch.stack(moves[len(moves) // 2:]).mean(0)


def test_a_gradient_that_matches_its_prediction_gets_a_large_step() -> None:
    """A constant gradient (zero curvature, perfect belief): Adam's step tends to α whatever |g|, while
    AdaBelief's s_t falls to its floor ε/(1 - β₂) and the step tends to α|g| / √(ε/(1 - β₂))."""
    lr, beta2, eps = 1e-3, 0.99, 1e-12
    g = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    gradients = g.expand(8000, 3)
    adam = last_step(Adam, gradients[:2000], lr=lr, betas=(0.9, beta2))
    torch.testing.assert_close(adam, torch.full((3,), lr, dtype=torch.float64), rtol=1e-3, atol=0)
    belief = last_step(AdaBelief, gradients, lr=lr, betas=(0.9, beta2), eps=eps)
    floor = math.sqrt(eps / (1 - beta2))  # √s_∞
    assert (belief / (lr * g / floor)).sub(1).abs().max() < 0.05
    assert (belief > 100 * lr).all()


def test_a_noisy_gradient_gets_a_small_step_whatever_its_size() -> None:
    """g_t = 1 + σ ξ_t: AdaBelief's step is about α·1/σ (a signal-to-noise step: 10x smaller for 10x the
    noise), Adam's about α/√(1 + σ²) (barely changes)."""
    noise = torch.randn(3000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = {}
    for sigma in (0.1, 1.0):
        gradients = 1 + sigma * noise
        steps[sigma] = (last_step(AdaBelief, gradients, lr=1e-3, betas=(0.9, 0.99)).item(),
                        last_step(Adam, gradients, lr=1e-3, betas=(0.9, 0.99)).item())
    belief_ratio = steps[0.1][0] / steps[1.0][0]
    adam_ratio = steps[0.1][1] / steps[1.0][1]
    assert 5 < belief_ratio < 20 and adam_ratio < 2, (belief_ratio, adam_ratio)


def test_amsgrad_keeps_the_largest_belief_error() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = AdaBelief([p], amsgrad=True)
    previous = None
    for t in range(40):
        p.grad = torch.randn(4) * (10.0 if t == 5 else 1.0)  # one surprising gradient
        optimizer.step()
        s_max = optimizer.state[p]["max_exp_avg_var"].clone()
        assert previous is None or (s_max >= previous).all()
        previous = s_max


def test_a_state_dict_round_trip_continues_the_same_trajectory() -> None:
    settings = {"lr": 1e-2, "amsgrad": True, "rectify": True}
    straight = ours(steps=10, **settings)
    theta = torch.nn.Parameter(start())
    optimizer = AdaBelief([theta], **settings)
    data = torch.Generator().manual_seed(1)
    for step in range(10):
        if step == 5:
            saved = optimizer.state_dict()
            optimizer = AdaBelief([theta], **settings)
            optimizer.load_state_dict(saved)
        optimizer.zero_grad()
        objective(theta, data).backward()
        optimizer.step()
    assert torch.equal(theta.detach(), straight[-1])


def test_bad_hyperparameters_are_clear_errors() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(PapertrainError, match="betas"):
        AdaBelief(p, betas=(1.0, 0.999))
    with pytest.raises(PapertrainError, match="eps=-1"):
        AdaBelief(p, eps=-1)
    with pytest.raises(PapertrainError, match="rectify"):
        AdaBelief(p, betas=(0.9, 0.5), rectify=True)


@pytest.mark.slow
def test_a_gpt_learns_shakespeare_with_adabelief(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_GPT, "trainer.max_steps=300", "trainer.batch_size=16",
                                  "trainer.eval_batches=8"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65) and trained < 2.8
