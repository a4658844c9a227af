"""Evidential deep learning: eq. 5 and the KL term equal independent float64 computations (the KL also
torch.distributions'), subjective logic's b + u = 1, the annealing, and a LeNet that learns MNIST and is
more uncertain about rotated digits than upright ones."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.vision.evidential.model import (EvidentialLeNet, evidential_loss, kl_to_uniform_dirichlet,
                                                        opinion, rotate, to_evidence)
from papertrain.recipes.vision.evidential.task import EvidentialTask
from papertrain.trainer import Trainer

CONFIG = RECIPES / "vision" / "evidential" / "tiny.yaml"


def reference_kl(alpha: list[float]) -> float:
    """KL[Dir(α) ‖ Dir(1)] from its closed form, one example, Python floats (math.lgamma; ψ by its series)."""
    def digamma(x: float) -> float:  # ψ(x) = ψ(x + n) - Σ 1/(x + i), then the asymptotic series for large x
        shift = 0.0
        while x < 20:
            shift -= 1 / x
            x += 1
        return shift + math.log(x) - 1 / (2 * x) - 1 / (12 * x**2) + 1 / (120 * x**4) - 1 / (252 * x**6)

    total, k = sum(alpha), len(alpha)
    value = math.lgamma(total) - math.lgamma(k) - sum(math.lgamma(a) for a in alpha)
    return value + sum((a - 1) * (digamma(a) - digamma(total)) for a in alpha)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_kl_to_the_uniform_dirichlet_equals_its_closed_form_and_torch_distributions(scale: float) -> None:
    alpha = 1 + torch.rand(12, 10, dtype=torch.float64) * scale
    ours = kl_to_uniform_dirichlet(alpha)
    closed_form = torch.tensor([reference_kl(row.tolist()) for row in alpha], dtype=torch.float64)
    torch.testing.assert_close(ours, closed_form, rtol=1e-10, atol=1e-10)
    library = torch.distributions.kl_divergence(torch.distributions.Dirichlet(alpha),
                                                torch.distributions.Dirichlet(torch.ones_like(alpha)))
    torch.testing.assert_close(ours, library, rtol=1e-10, atol=1e-10)
    assert float(kl_to_uniform_dirichlet(torch.ones(1, 10, dtype=torch.float64))) == pytest.approx(0, abs=1e-12)


def reference_loss(outputs: torch.Tensor, labels: torch.Tensor, annealing: float) -> float:
    """eq. 5 + λ_t KL(Dir(α̃) ‖ Dir(1)) written out per example in float64, ReLU evidence."""
    total = 0.0
    for row, label in zip(outputs.double().tolist(), labels.tolist()):
        alpha = [max(v, 0.0) + 1 for v in row]
        strength = sum(alpha)
        y = [1.0 if j == label else 0.0 for j in range(len(row))]
        p = [a / strength for a in alpha]
        fit = sum((yj - pj) ** 2 + pj * (1 - pj) / (strength + 1) for yj, pj in zip(y, p))
        alpha_tilde = [yj + (1 - yj) * a for yj, a in zip(y, alpha)]
        total += fit + annealing * reference_kl(alpha_tilde)
    return total / len(labels)


@pytest.mark.parametrize("annealing", [0.0, 0.3, 1.0])
def test_the_loss_equals_an_independent_float64_computation(annealing: float) -> None:
    torch.manual_seed(0)
    outputs, labels = torch.randn(16, 10) * 4, torch.randint(0, 10, (16,))
    loss, parts = evidential_loss(outputs, labels, annealing)
    assert float(loss) == pytest.approx(reference_loss(outputs, labels, annealing), rel=1e-5, abs=1e-6)
    assert float(parts["annealing"]) == pytest.approx(annealing)


def test_the_expected_squared_error_is_the_dirichlet_expectation() -> None:
    """eq. 5 is E_{p ~ Dir(α)} Σ_j (y_j - p_j)²: check against Monte Carlo draws from torch's Dirichlet."""
    alpha = torch.tensor([[4.0, 1.5, 1.0, 2.5]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    from papertrain.recipes.vision.evidential.model import expected_squared_error

    torch.manual_seed(1)
    draws = torch.distributions.Dirichlet(alpha[0]).sample((400_000,))
    monte_carlo = float(((y - draws) ** 2).sum(-1).mean())
    assert float(expected_squared_error(alpha, y)) == pytest.approx(monte_carlo, rel=3e-3)


def test_belief_and_uncertainty_sum_to_one_and_no_evidence_is_total_uncertainty() -> None:
    evidence = to_evidence(torch.randn(32, 10) * 5)
    belief, u, p = opinion(evidence + 1)
    torch.testing.assert_close(belief.sum(-1) + u, torch.ones(32))
    torch.testing.assert_close(p.sum(-1), torch.ones(32))
    assert (belief >= 0).all() and ((u > 0) & (u <= 1)).all()
    _, u0, p0 = opinion(torch.ones(1, 10))
    assert float(u0) == 1.0 and torch.allclose(p0, torch.full((1, 10), 0.1))


def test_annealing_grows_linearly_with_the_training_steps_and_stops_at_one() -> None:
    model, task = EvidentialLeNet(channels=(2, 4), hidden=8), EvidentialTask(annealing_steps=4)
    batch = {"image": torch.rand(3, 1, 28, 28), "label": torch.tensor([0, 1, 2])}
    seen = [float(task.loss(model.train(), batch, SimpleNamespace(step=step))[1]["annealing"]) for step in range(6)]
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert "trained_steps" not in model.state_dict()  # the step comes from the loop, not a model buffer


def test_the_annealing_reads_the_loops_step_and_resumes_with_it(tmp_path: Path) -> None:
    """λ_t logged by a run equals min(1, t / annealing_steps) for t = 0, 1, ... including after a resume."""
    quick = ["data.train_examples=256", "data.val_examples=64", "task.annealing_steps=4", "trainer.batch_size=16",
             "trainer.log_every=1", "trainer.eval_every=0", "trainer.sample_every=-1", "trainer.progress=none",
             "trainer.plot=false", "trainer.tensorboard=false", "model.channels=[2,4]", "model.hidden=8",
             "trainer.eval_batches=1"]
    Trainer(load_config(CONFIG, [*quick, "trainer.max_steps=3", "trainer.checkpoint_every=3"]), tmp_path).run()
    Trainer(load_config(CONFIG, [*quick, "trainer.max_steps=6"]), tmp_path).run()
    from papertrain.metrics import read_metrics

    logged = [e["train/annealing"] for e in read_metrics(tmp_path / "metrics.jsonl") if "train/annealing" in e]
    assert logged == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_rotation_by_90_degrees_is_exact_on_the_pixel_grid() -> None:
    image = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(rotate(rotate(image, 90), -90), image, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(image, 90), torch.rot90(image, k=1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(PapertrainError, match="28, 28"):
        EvidentialLeNet()(torch.zeros(2, 1, 32, 32))
    with pytest.raises(PapertrainError, match="task.loss"):
        EvidentialTask(loss="hinge")
    with pytest.raises(PapertrainError, match="evidence"):
        EvidentialTask(evidence="sigmoid")


# The tiny config's LeNet and exp evidence on 10,000 training digits for 400 steps of 64: about 20 s on one core.
LEARNING = ["data.train_examples=10000", "data.val_examples=2000", "task.annealing_steps=200", "trainer.max_steps=400", "trainer.eval_every=0", "trainer.eval_batches=32",
            "trainer.sample_every=-1", "trainer.checkpoint_every=0", "trainer.progress=none", "trainer.plot=false",
            "trainer.tensorboard=false", "trainer.threads=1"]


@pytest.mark.slow
def test_rotated_digits_are_more_uncertain_than_upright_ones(tmp_path: Path) -> None:
    """The paper's Fig. 1 and 3: a "1" rotated by 60-180° is no digit the network knows, and its evidence
    should say so (u = K/S near 1), while upright validation digits are classified with little uncertainty."""
    trainer = Trainer(load_config(CONFIG, LEARNING), tmp_path / "run")
    metrics = trainer.run().metrics
    model, task, data = trainer.raw_model.eval(), trainer.task, trainer.data
    ones = data.val.tensors["image"][data.val.tensors["label"] == 1]
    with torch.no_grad():
        upright = task.mean_uncertainty(model, data.val.tensors["image"])
        rotated = sum(task.mean_uncertainty(model, ones, angle) for angle in (60, 90, 120, 150, 180)) / 5
        upright_ones = task.mean_uncertainty(model, ones)
    print(f"val/accuracy {metrics['val/accuracy']:.3f}; mean u: upright {upright:.3f}, upright 1s "
          f"{upright_ones:.3f}, 1s rotated 60-180° {rotated:.3f}")
    assert metrics["val/accuracy"] > 0.9  # chance is 0.1
    assert rotated > upright + 0.2 and rotated > 2 * upright
