"""The Noam schedule is eq. 3 of "Attention Is All You Need", peaks at warmup_steps with
d^-0.5·warmup^-0.5, equals torch's LambdaLR with the same formula and resumes exactly; a GPT learns
with Adam and it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, learns
from papertrain.config import load_config
from papertrain.recipes.optim.noam.model import LinearWarmup, Noam, noam_rate

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "optim" / "noam" / "tiny.yaml"


def rates(make_scheduler, steps: int, base_lr: float = 1.0) -> list[float]:
    """The learning rate used by each of `steps` updates, as the trainer drives a scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    used = []
    optimizer.step()  # (a schedule does not depend on the steps; one keeps torch from warning about their order)
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return used


@pytest.mark.parametrize("d_model, warmup", [(512, 4000), (128, 100), (1024, 1)])
def test_the_schedule_is_equation_3(d_model: int, warmup: int) -> None:
    """lrate = d^-0.5 · min(n^-0.5, n·warmup^-1.5) for the n-th update, n = 1 .. 3·warmup + 500."""
    steps = 3 * warmup + 500
    got = rates(lambda o: Noam(o, d_model=d_model, warmup_steps=warmup), steps)
    expected = [d_model ** -0.5 * min(n ** -0.5, n * warmup ** -1.5) for n in range(1, steps + 1)]
    assert max(abs(a - b) / b for a, b in zip(got, expected)) < 1e-12
    assert max(abs(a - noam_rate(n, d_model, warmup)) / a for n, a in enumerate(got, start=1)) < 1e-12


def test_the_peak_is_at_warmup_with_d_to_the_minus_half_times_warmup_to_the_minus_half() -> None:
    d_model, warmup = 512, 4000
    got = rates(lambda o: Noam(o, d_model=d_model, warmup_steps=warmup), 3 * warmup)
    peak = max(range(len(got)), key=got.__getitem__)
    assert peak + 1 == warmup  # the warmup-th update
    assert got[peak] == pytest.approx(d_model ** -0.5 * warmup ** -0.5, rel=1e-12)
    assert all(a < b for a, b in zip(got[:peak], got[1:peak + 1]))  # a linear rise ...
    assert all(a > b for a, b in zip(got[peak:], got[peak + 1:]))  # ... then a steady decay
    assert got[2 * warmup - 1] == pytest.approx(got[peak] / math.sqrt(2), rel=1e-12)  # then 1/√n


def test_torch_lambdalr_with_the_same_formula_gives_the_same_rates() -> None:
    def lam(t: int) -> float:  # LambdaLR counts from t = 0
        return noam_rate(t + 1, 256, 300)

    ours = rates(lambda o: Noam(o, d_model=256, warmup_steps=300), 1500, base_lr=0.7)
    theirs = rates(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam), 1500, base_lr=0.7)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-15


@pytest.mark.parametrize("make", [lambda o: Noam(o, d_model=64, warmup_steps=20), lambda o: LinearWarmup(o, 20)],
                         ids=["noam", "linear-warmup"])
def test_a_state_dict_round_trip_continues_the_schedule_exactly(make) -> None:
    straight = rates(make, 60)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer)
    resumed = []
    for t in range(60):
        if t == 25:  # a fresh optimizer and scheduler, loaded from the saved state
            saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            scheduler = make(optimizer)
            optimizer.load_state_dict(saved_optimizer)
            scheduler.load_state_dict(saved_scheduler)
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == straight


def test_linear_warmup_rises_to_the_base_rate_and_stays() -> None:
    assert rates(lambda o: LinearWarmup(o, 4), 7, base_lr=2.0) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]
    assert rates(lambda o: LinearWarmup(o, 0), 3, base_lr=2.0) == [2.0, 2.0, 2.0]


@pytest.mark.slow
def test_a_gpt_learns_shakespeare_with_adam_and_the_noam_schedule(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_GPT, "trainer.max_steps=300", "trainer.batch_size=16",
                                  "trainer.eval_batches=8", "model.d_model=32", "scheduler.warmup_steps=30",
                                  "optimizer.lr=0.2"])  # the tiny config's peak for d = 32: 0.2·32^-0.5·30^-0.5
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65) and trained < 2.8
