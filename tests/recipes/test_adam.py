"""Adam and AMSGrad: the same trajectories as torch.optim on the same parameters and gradients, Reddi et
al.'s counterexample (Adam converges to the worst point, AMSGrad to the best), checkpointable state, and
a GPT that learns with them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, learns, optimizer_trajectory
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.optim.adam.model import Adam

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "optim" / "adam" / "tiny.yaml"


@pytest.mark.parametrize("settings", [
    {}, {"amsgrad": True}, {"weight_decay": 0.05}, {"weight_decay": 0.05, "amsgrad": True},
    {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6},
], ids=["adam", "amsgrad", "l2", "l2-amsgrad", "other-hyperparameters"])
def test_trajectory_equals_torch_optim_adam_for_100_steps(settings: dict) -> None:
    ours = optimizer_trajectory(lambda p: Adam(p, **settings))
    reference = optimizer_trajectory(lambda p: torch.optim.Adam(p, **settings))
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) <= 1e-6


def test_decoupled_weight_decay_equals_torch_optim_adamw() -> None:
    ours = optimizer_trajectory(lambda p: Adam(p, lr=1e-2, weight_decay=0.1, decoupled=True))
    reference = optimizer_trajectory(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) <= 1e-6


def reddi_counterexample(amsgrad: bool, steps: int = 30_000, C: float = 3.0) -> float:
    """Reddi et al. 2018, Theorem 1: f_t(x) = C·x when t mod 3 = 1, else -x, on x ∈ [-1, 1]. The regret-
    minimising point is x = -1 (the sum over each period is (C - 2)·x); with β₁ = 0, β₂ = 1/(1 + C²) and
    α_t = α/√t, Adam drifts to x = +1."""
    x = torch.nn.Parameter(torch.zeros(1))
    optimizer = Adam([x], lr=0.5, betas=(0.0, 1 / (1 + C**2)), amsgrad=amsgrad)
    for t in range(1, steps + 1):
        optimizer.param_groups[0]["lr"] = 0.5 / math.sqrt(t)
        x.grad = torch.tensor([C if t % 3 == 1 else -1.0])
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # the projection onto the feasible set
    return x.item()


def test_adam_converges_to_the_worst_point_and_amsgrad_to_the_best() -> None:
    assert reddi_counterexample(amsgrad=False) > 0.99
    assert reddi_counterexample(amsgrad=True) < -0.99


def test_amsgrad_never_increases_the_effective_step_size() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = Adam([p], amsgrad=True)
    previous = None
    for t in range(50):
        p.grad = torch.randn(4) * (10.0 if t == 5 else 1.0)  # one large gradient, then small ones
        optimizer.step()
        v_max = optimizer.state[p]["max_exp_avg_sq"].clone()
        if previous is not None:
            assert (v_max >= previous).all()
        previous = v_max


def test_a_state_dict_round_trip_continues_the_same_trajectory() -> None:
    """10 steps straight == 5 steps, the optimizer rebuilt from its state_dict, then 5 more."""
    def make(params):
        return Adam(params, amsgrad=True)

    straight = optimizer_trajectory(make, steps=10)
    assert torch.equal(optimizer_trajectory(make, steps=10, rebuild_at=5)[-1], straight[-1])


def test_bad_hyperparameters_are_clear_errors() -> None:
    with pytest.raises(PapertrainError, match="betas"):
        Adam([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))
    with pytest.raises(PapertrainError, match="lr=-1"):
        Adam([torch.nn.Parameter(torch.zeros(1))], lr=-1)


def test_a_gpt_learns_shakespeare_with_this_adam(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_GPT, "trainer.max_steps=300", "trainer.batch_size=16",
                                  "trainer.eval_batches=8"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65) and trained < 2.8
