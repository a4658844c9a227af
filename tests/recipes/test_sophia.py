"""Sophia-G: Algorithm 3's equations, written out in float64, give the same trajectories; the clip bounds
every coordinate's step by η; with the exact curvature the unclipped step is Newton's; the Gauss-Newton-
Bartlett estimate's mean is the diagonal of the Gauss-Newton matrix; a GPT learns with the trainer's
curvature hook active."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, learns
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.optim.sophia.model import SophiaG
from papertrain.recipes.transformers.gpt.task import LanguageModelTask

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "optim" / "sophia" / "tiny.yaml"
N, K, B = 64, 10, 7  # parameters, curvature_every, sampled labels per estimate


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A separable quadratic ½ Σ aᵢ θᵢ² with curvatures spread over two orders of magnitude, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    curvature = torch.logspace(-1, 1, N, dtype=torch.float64)[torch.randperm(N, generator=generator)]
    theta0 = torch.randn(N, generator=generator, dtype=torch.float64)
    return curvature, theta0, generator


def gradient(curvature: torch.Tensor, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return curvature * theta + 0.1 * torch.randn(N, generator=generator, dtype=torch.float64)


def sampled_gradient(curvature: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A stand-in for ĝ: B·ĝ² is a noisy estimate of the curvature."""
    return (curvature / B).sqrt() * torch.randn(N, generator=generator, dtype=torch.float64)


def ours(steps: int = 100, **settings) -> list[torch.Tensor]:
    curvature, theta0, generator = problem()
    theta = torch.nn.Parameter(theta0.clone())
    optimizer = SophiaG([theta], curvature_every=K, **settings)
    path = []
    for t in range(steps):
        if t and t % K == 0:  # what the trainer does before every k-th step
            theta.grad = sampled_gradient(curvature, generator)
            optimizer.update_curvature(B)
        theta.grad = gradient(curvature, theta.detach(), generator)
        optimizer.step()
        path.append(theta.detach().clone())
    return path


def algorithm_3(steps: int = 100, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), gamma: float = 0.01,
                eps: float = 1e-12, weight_decay: float = 0.2) -> tuple[list[torch.Tensor], float]:
    """The paper's Algorithm 3 with the GNB estimator's output B·ĝ⊙ĝ, line by line, in float64.
    Returns the path and the fraction of coordinate-steps that the clip cut."""
    beta1, beta2 = betas
    curvature, theta, generator = problem()
    m, h = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    path, clipped = [], 0
    for t in range(steps):
        if t and t % K == 0:
            g_hat = sampled_gradient(curvature, generator)
            h = beta2 * h + (1 - beta2) * B * g_hat * g_hat  # h_t = β₂ h_{t-k} + (1 - β₂) ĥ_t
        g = gradient(curvature, theta, generator)
        m = beta1 * m + (1 - beta1) * g  # m_t
        theta = theta - lr * weight_decay * theta  # θ_t ← θ_t - η λ θ_t
        ratio = m / torch.maximum(gamma * h, torch.tensor(eps, dtype=torch.float64))
        clipped += int((ratio.abs() > 1).sum())
        theta = theta - lr * ratio.clamp(-1, 1)  # θ_{t+1} = θ_t - η clip(m_t / max{γ h_t, ε}, 1)
        path.append(theta.clone())
    return path, clipped / (steps * N)


@pytest.mark.parametrize("settings", [
    {}, {"lr": 0.1, "gamma": 1.0}, {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.0},
    {"lr": 5e-2, "gamma": 1.0, "eps": 1e-3, "weight_decay": 0.1},
], ids=["paper-defaults", "larger-steps", "other-betas", "large-gamma-and-eps"])
def test_trajectory_equals_algorithm_3_in_float64_for_100_steps(settings: dict) -> None:
    reference, _ = algorithm_3(**settings)
    path = ours(**settings)
    assert max((a - b).abs().max().item() for a, b in zip(path, reference)) <= 1e-9


def test_the_reference_exercises_both_clipped_and_newton_like_steps() -> None:
    """(So that the comparison above is not only about signs.)"""
    _, clipped = algorithm_3(lr=0.1, gamma=1.0)
    assert 0.1 < clipped < 0.9, clipped


def test_the_clip_bounds_every_coordinates_step_by_lr() -> None:
    """|θ_{t+1} - (1 - ηλ)θ_t| <= η whatever m and h (here h = 0 for some coordinates, tiny or huge for
    others); equal to η exactly where |m| >= γh, and η|m|/(γh) below that."""
    lr, gamma = 0.1, 0.01
    theta = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    optimizer = SophiaG([theta], lr=lr, betas=(0.0, 0.0), gamma=gamma, weight_decay=0.0, curvature_every=1)
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-6, 6, (1000,), generator=generator)
    h = torch.rand(1000, generator=generator, dtype=torch.float64) * scales
    h[:100] = 0.0
    theta.grad = (h / 3).sqrt()  # B = 3: ĥ = 3·ĝ² = h (β₂ = 0)
    optimizer.update_curvature(3)
    g = torch.randn(1000, generator=generator, dtype=torch.float64) * 10.0 ** torch.randint(-4, 4, (1000,),
                                                                                          generator=generator)
    theta.grad = g
    optimizer.step()
    step = theta.detach().abs()
    assert (step <= lr * (1 + 1e-12)).all()
    saturated = g.abs() >= gamma * h
    assert saturated[:100].all() and 0 < saturated.sum() < 1000
    torch.testing.assert_close(step[saturated], torch.full_like(step[saturated], lr), rtol=1e-12, atol=0)
    torch.testing.assert_close(step[~saturated], lr * g[~saturated].abs() / (gamma * h[~saturated]), rtol=1e-12, atol=0)


def test_with_the_exact_curvature_an_unclipped_step_is_newtons() -> None:
    """On ½ Σ aᵢ θᵢ² with h = a (exact), β₁ = 0, λ = 0 and η = γ, the step is η·clip(aθ/(γa), 1) = θ
    wherever |θ| <= γ: one step to the minimum, for curvatures over four orders of magnitude. (Adam's
    first step would be η·sign(θ), SGD's ηaθ.)"""
    a = torch.logspace(-2, 2, 50, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 50, dtype=torch.float64))
    optimizer = SophiaG([theta], lr=1.0, betas=(0.0, 0.0), gamma=1.0, weight_decay=0.0, curvature_every=1)
    theta.grad = a.sqrt()  # B = 1: ĥ = ĝ² = a
    optimizer.update_curvature(1)
    theta.grad = a * theta.detach()  # ∇ = aθ
    optimizer.step()
    assert theta.detach().abs().max() < 1e-15


class SoftmaxRegression(torch.nn.Module):
    """f(x) = W x + c on feature vectors x: the logits [B, T, V] that LanguageModelTask expects."""

    def __init__(self, features: int = 3, classes: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(features, classes, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_the_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal() -> None:
    """E[B·ĝ⊙ĝ] = (1/B) Σ_b diag(J_bᵀ (diag(p_b) - p_b p_bᵀ) J_b). For softmax regression J is x_b ⊗ I (and I
    for the bias), so the diagonal is (1/B) Σ_b (p_bk - p_bk²) x_bj² for W_kj and (1/B) Σ_b (p_bk - p_bk²)
    for c_k. The mean of n estimates (labels sampled by LanguageModelTask.sampled_loss, ĥ formed by
    SophiaG.update_curvature) must be within 5 standard errors of it, coordinate by coordinate."""
    torch.set_num_threads(1)  # 2,000 passes over tiny tensors: threads only add overhead
    torch.manual_seed(0)
    model = SoftmaxRegression()
    x = torch.randn(2, 3, 3, dtype=torch.float64) * 1.5  # 2 sequences of 3 "tokens": B = 6 labels
    batch = {"input_ids": x}
    optimizer = SophiaG(model.parameters(), betas=(0.0, 0.0), curvature_every=1)  # β₂ = 0: h = ĥ
    task = LanguageModelTask()
    samples, n = [], 2000
    for draw in range(n):
        model.zero_grad()
        generators = [torch.Generator().manual_seed(2 * draw + row) for row in range(2)]
        task.sampled_loss(model, batch, generators).backward()
        optimizer.update_curvature(6)
        samples.append(torch.cat([optimizer.state[p]["hessian"].flatten() for p in model.parameters()]))
    samples = torch.stack(samples)
    with torch.no_grad():
        p = model(x).softmax(-1).reshape(6, 4)  # [B, V]
        features = x.reshape(6, 3)
        s = p - p * p  # the diagonal of diag(p) - ppᵀ
        weight_diagonal = (s[:, :, None] * features[:, None, :] ** 2).mean(0)  # [V, features]
        gauss_newton = torch.cat([weight_diagonal.flatten(), s.mean(0)])
    standard_error = samples.std(0) / math.sqrt(n)
    error = (samples.mean(0) - gauss_newton).abs()
    print(f"max |error| / standard error {(error / standard_error).max():.2f}, "
          f"max relative error {(error / gauss_newton).max():.3f}")
    assert (error <= 5 * standard_error).all()
    assert (error / gauss_newton).max() < 0.15


def test_sampled_labels_follow_the_models_distribution() -> None:
    """The labels sampled_loss draws are distributed as softmax(logits). They can be read back from the
    gradient: for logits z_t, ∂/∂z_t of the mean cross-entropy over T labels is (p - e_ŷt)/T."""
    tokens = 3000
    logits = torch.nn.Parameter(torch.tensor([2.0, 0.0, -1.0, 0.5]).repeat(1, tokens, 1))  # [1, T, 4]
    p = logits.detach()[0, 0].softmax(-1)
    LanguageModelTask().sampled_loss(lambda ids: logits, {"input_ids": torch.zeros(1, tokens)},
                                     [torch.Generator().manual_seed(0)]).backward()
    labels = (p - tokens * logits.grad[0]).argmax(-1)  # e_ŷ = p - T·∂loss/∂z
    frequency = torch.bincount(labels, minlength=4) / tokens
    assert ((frequency - p).abs() <= 4 * (p * (1 - p) / tokens).sqrt()).all(), (frequency, p)


def test_a_state_dict_round_trip_keeps_the_curvature() -> None:
    straight = ours(steps=25, lr=1e-2)
    curvature, theta0, generator = problem()
    theta = torch.nn.Parameter(theta0.clone())
    optimizer = SophiaG([theta], lr=1e-2, curvature_every=K)
    for t in range(25):
        if t == 15:  # after the curvature update of step 10, before that of step 20
            saved = optimizer.state_dict()
            optimizer = SophiaG([theta], lr=1e-2, curvature_every=K)
            optimizer.load_state_dict(saved)
        if t and t % K == 0:
            theta.grad = sampled_gradient(curvature, generator)
            optimizer.update_curvature(B)
        theta.grad = gradient(curvature, theta.detach(), generator)
        optimizer.step()
    assert torch.equal(theta.detach(), straight[-1])


def test_bad_hyperparameters_are_clear_errors() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(PapertrainError, match="betas"):
        SophiaG(p, betas=(0.965, 1.0))
    with pytest.raises(PapertrainError, match="gamma=0"):
        SophiaG(p, gamma=0)
    with pytest.raises(PapertrainError, match="curvature_every=0"):
        SophiaG(p, curvature_every=0)
    with pytest.raises(PapertrainError, match="lr=-1"):
        SophiaG(p, lr=-1)


@pytest.mark.slow
def test_a_gpt_learns_shakespeare_with_sophia_and_the_curvature_hook(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_GPT, "trainer.max_steps=300", "trainer.batch_size=32",
                                  "trainer.eval_batches=4", "optimizer.curvature_every=5"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65) and trained < 2.8
