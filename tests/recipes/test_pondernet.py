"""PonderNet: the halting distribution (eq. 1) sums to 1 and is geometric for a constant λ, the KL and the
loss equal independent float64 computations, evaluation samples n ~ p, and pondering learns parity that
one step of the same cell does not."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.adaptive.pondernet.model import (PonderNet, geometric_prior, halting_distribution,
                                                         halting_step, kl_to_prior, ponder_loss)
from papertrain.recipes.adaptive.pondernet.task import ParityData, PonderTask
from papertrain.trainer import Trainer

CONFIG = RECIPES / "adaptive" / "pondernet" / "tiny.yaml"


@pytest.mark.parametrize("n_steps", [2, 5, 20])
def test_p_sums_to_one_and_the_last_step_takes_the_remainder(n_steps: int) -> None:
    logits = torch.randn(64, n_steps - 1, dtype=torch.float64) * 3
    p = halting_distribution(logits).exp()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
    lam = torch.sigmoid(logits)
    torch.testing.assert_close(p[:, -1], (1 - lam).prod(dim=1), rtol=1e-10, atol=0)  # never halted before N
    for n in range(n_steps - 1):  # p_n = λ_n Π_{j<n} (1 - λ_j), eq. 1
        torch.testing.assert_close(p[:, n], lam[:, n] * (1 - lam[:, :n]).prod(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.9])
def test_a_constant_lambda_gives_the_geometric_distribution(lam: float) -> None:
    n_steps = 12
    logit = math.log(lam / (1 - lam))
    p = halting_distribution(torch.full((1, n_steps - 1), logit, dtype=torch.float64)).exp()[0]
    closed_form = [lam * (1 - lam) ** (n - 1) for n in range(1, n_steps)] + [(1 - lam) ** (n_steps - 1)]
    torch.testing.assert_close(p, torch.tensor(closed_form, dtype=torch.float64), rtol=1e-10, atol=0)


def test_the_tail_stays_finite_when_p_underflows() -> None:
    """Confident early halting drives p_N below float32's range; log p (and so the KL) stays finite."""
    log_p = halting_distribution(torch.full((2, 29), 20.0))  # λ ≈ 1 - 2e-9 at every step
    assert torch.isfinite(log_p).all() and log_p[0, -1] < -500
    assert torch.isfinite(kl_to_prior(log_p, geometric_prior(0.2, 30))).all()


@pytest.mark.parametrize("lambda_p, n_steps", [(0.2, 10), (0.5, 3), (0.05, 25)])
def test_kl_to_the_truncated_geometric_prior_equals_torch_distributions(lambda_p: float, n_steps: int) -> None:
    log_p = halting_distribution(torch.randn(16, n_steps - 1) * 2)
    log_prior = geometric_prior(lambda_p, n_steps)
    prior = torch.tensor([lambda_p * (1 - lambda_p) ** n for n in range(n_steps)])
    torch.testing.assert_close(log_prior.exp(), prior / prior.sum())  # truncated at N, renormalised
    reference = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=log_p.exp()),
                                                  torch.distributions.Categorical(probs=prior / prior.sum()))
    torch.testing.assert_close(kl_to_prior(log_p, log_prior), reference, atol=1e-5, rtol=1e-5)


def reference_loss(y_hat: torch.Tensor, halt_logits: torch.Tensor, y: torch.Tensor, beta: float,
                   lambda_p: float) -> float:
    """eqs. 1-4 in float64, written out: probabilities by products, BCE and KL by their definitions."""
    y_hat, halt_logits, y = y_hat.double(), halt_logits.double(), y.double()
    batch, n_steps = y_hat.shape
    lam = 1 / (1 + torch.exp(-halt_logits))
    total = 0.0
    for b in range(batch):
        p, survive = [], 1.0
        for n in range(n_steps - 1):
            p.append(survive * float(lam[b, n]))
            survive *= 1 - float(lam[b, n])
        p.append(survive)
        prior = [lambda_p * (1 - lambda_p) ** n for n in range(n_steps)]
        prior = [q / sum(prior) for q in prior]
        q_hat = [1 / (1 + math.exp(-float(v))) for v in y_hat[b]]
        bce = [-(float(y[b]) * math.log(q) + (1 - float(y[b])) * math.log(1 - q)) for q in q_hat]
        reconstruction = sum(pn * ln for pn, ln in zip(p, bce))
        kl = sum(pn * math.log(pn / qn) for pn, qn in zip(p, prior) if pn > 0)
        total += reconstruction + beta * kl
    return total / batch


@pytest.mark.parametrize("beta, lambda_p", [(0.01, 0.2), (1.0, 0.5), (0.0, 0.1)])
def test_the_loss_equals_an_independent_float64_computation(beta: float, lambda_p: float) -> None:
    torch.manual_seed(1)
    y_hat, halt_logits = torch.randn(8, 6) * 2, torch.randn(8, 5) * 2
    y = torch.randint(0, 2, (8,)).float()
    loss, parts = ponder_loss(y_hat, halting_distribution(halt_logits), y, beta, lambda_p)
    assert abs(float(loss) - reference_loss(y_hat, halt_logits, y, beta, lambda_p)) < 1e-5
    p = halting_distribution(halt_logits).exp()
    torch.testing.assert_close(parts["expected_steps"], (p * torch.arange(1, 7)).sum(1).mean())


def test_the_model_runs_a_gru_cell_and_reads_out_every_step() -> None:
    """ŷ_n and λ_n come from h_{n+1} = GRUCell(x, h_n), h_1 = 0: the same numbers as nn.GRU fed x N times."""
    model = PonderNet(input_size=6, hidden_size=10, max_steps=4)
    gru = torch.nn.GRU(6, 10, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(getattr(model.cell, name))
    x = torch.randn(3, 6)
    states, _ = gru(x[:, None].expand(-1, 4, -1))  # [B, N, hidden]
    y_hat, log_p = model(x)
    torch.testing.assert_close(y_hat, model.output(states).squeeze(-1))
    torch.testing.assert_close(log_p, halting_distribution(model.halting(states[:, :-1]).squeeze(-1)))


def test_the_fixed_depth_baseline_answers_at_its_last_step() -> None:
    model = PonderNet(input_size=6, hidden_size=10, max_steps=3, fixed_depth=True)
    assert model.halting is None
    y_hat, log_p = model(torch.randn(5, 6))
    assert torch.equal(log_p.exp(), torch.tensor([[0.0, 0.0, 1.0]]).expand(5, -1))
    y = torch.randint(0, 2, (5,)).float()
    loss, parts = ponder_loss(y_hat, log_p, y, beta=0.01, lambda_p=0.2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(y_hat[:, -1], y)
    torch.testing.assert_close(parts["reconstruction"], bce)
    assert float(parts["expected_steps"]) == 3.0 and torch.isfinite(loss)
    ponder = PonderNet(input_size=6, hidden_size=10, max_steps=3)
    assert sum(p.numel() for p in ponder.parameters()) - sum(p.numel() for p in model.parameters()) == 11


def test_evaluation_halts_at_a_step_drawn_from_p() -> None:
    """Inverse-CDF halting with u ~ U(0, 1) is a draw from p; u = 0.5 is p's median."""
    log_p = halting_distribution(torch.tensor([[-1.0, 0.5, -0.3, 2.0]]))
    p = log_p.exp()[0]
    u = torch.rand(200_000)
    steps = halting_step(log_p.expand(len(u), -1), u)
    frequencies = torch.bincount(steps, minlength=5).float() / len(u)
    torch.testing.assert_close(frequencies, p, atol=5e-3, rtol=0)
    median = int(halting_step(log_p, 0.5))
    assert p[:median].sum() <= 0.5 < p[:median + 1].sum()


def test_parity_data_follows_the_papers_definition() -> None:
    data = ParityData(n_elements=12, n_train=3000, n_val=10, seed=3)
    x, y, n_nonzero = data.train.tensors["x"], data.train.tensors["y"], data.train.tensors["n_nonzero"]
    assert set(x.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal((x != 0).sum(1), n_nonzero) and n_nonzero.min() == 1 and n_nonzero.max() == 12
    assert torch.equal(y, ((x == 1).sum(1) % 2).float())  # odd number of ones -> 1
    assert 0.45 < float(y.mean()) < 0.55
    again = ParityData(n_elements=12, n_train=3000, n_val=10, seed=3)
    assert torch.equal(again.train.tensors["x"], x)  # fixed by the seed


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(PapertrainError, match="at least 2 steps"):
        PonderNet(input_size=8, max_steps=1)
    with pytest.raises(PapertrainError, match="input_size=9"):
        PonderNet(input_size=8)(torch.zeros(2, 9))
    with pytest.raises(PapertrainError, match="halting"):
        PonderTask(halting="argmax")
    with pytest.raises(PapertrainError, match="lambda_p"):
        PonderTask(lambda_p=1.5)
    with pytest.raises(PapertrainError, match="model.input_size=16"):
        PonderTask().prepare(PonderNet(input_size=8), ParityData(n_elements=16, n_train=10, n_val=10))


# Parity of 8 elements, 2,000 steps: PonderNet (up to 10 steps) against the same GRU cell run once.
LEARNING = ["data.n_elements=8", "data.n_train=50000", "data.n_val=1024", "model.max_steps=10",
            "optimizer.lr=3e-3", "trainer.max_steps=2000", "trainer.eval_every=0", "trainer.eval_batches=8",
            "trainer.checkpoint_every=0", "trainer.sample_every=-1", "trainer.progress=none", "trainer.plot=false",
            "trainer.tensorboard=false", "trainer.threads=1"]


@pytest.mark.slow
def test_pondering_learns_parity_that_one_step_of_the_same_cell_does_not(tmp_path: Path) -> None:
    ponder = Trainer(load_config(CONFIG, LEARNING), tmp_path / "ponder").run().metrics
    one_step = Trainer(load_config(CONFIG, [*LEARNING, "model.fixed_depth=true", "model.max_steps=1"]),
                       tmp_path / "one_step").run().metrics
    print(f"PonderNet: val/accuracy {ponder['val/accuracy']:.3f} after E[n] = {ponder['val/expected_steps']:.1f} "
          f"steps; one step: {one_step['val/accuracy']:.3f}")
    assert ponder["val/accuracy"] > 0.9 and one_step["val/accuracy"] < 0.65
    assert 1.5 < ponder["val/expected_steps"] < 10
