"""Generative adversarial nets (recipes/gans/gan): Proposition 1 and Theorem 1 on a 1-D problem with known
densities, the losses against the value function written out, §3's argument for the non-saturating loss,
the scores, the engine's promises for a task that owns its step (each optimizer steps only its player,
exact resume, 2 ranks = 1 process under DDP and FSDP2, DeepSpeed refused), and MNIST digits learnt."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import RECIPES
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.recipes.gans.gan.model import (LOG_4, discriminator_loss, generator_loss,
                                               optimal_discriminator)
from papertrain.recipes.gans.gan.task import class_coverage, inception_score
from papertrain.trainer import Trainer

CONFIG = RECIPES / "gans" / "gan" / "tiny.yaml"


# -- Proposition 1 and Theorem 1, on the real line ------------------------------------------------------
def normal_pdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def integral(values: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.trapezoid(values, x))


def value(d: torch.Tensor, p_data: torch.Tensor, p_g: torch.Tensor, x: torch.Tensor) -> float:
    """V(D, G) = ∫ p_data log D + p_g log(1 - D) dx, by quadrature (eq. 1 with the expectations as integrals)."""
    return integral(torch.special.xlogy(p_data, d) + torch.special.xlogy(p_g, 1 - d), x)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """JSD(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m), m = (p + q)/2, by quadrature."""
    m = (p + q) / 2
    kl = lambda a: integral(torch.special.xlogy(a, a) - torch.special.xlogy(a, m), x)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def trained_discriminator(data: tuple[float, float], generated: tuple[float, float], seed: int) -> nn.Module:
    """A small 1-D MLP trained to convergence with the recipe's discriminator loss on fresh samples of
    N(data) (real) and N(generated) (G's samples, held fixed): 600 Adam steps of 2,048 + 2,048 draws."""
    torch.manual_seed(seed)
    draws = torch.Generator().manual_seed(seed + 1000)
    d = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(d.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # [4096, 32] matmuls: a second thread only waits (several times slower on shared cores)
    try:
        for _ in range(600):
            x = data[0] + data[1] * torch.randn(2048, 1, generator=draws)
            fake = generated[0] + generated[1] * torch.randn(2048, 1, generator=draws)
            logits = d(torch.cat([x, fake])).squeeze(-1)  # [4096]
            loss = discriminator_loss(logits[:2048], logits[2048:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return d.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_trained_discriminator_approaches_the_optimal_one_and_C_of_G_is_minus_log_4_plus_2_jsd(seed: int) -> None:
    """p_data = N(0, 1), p_g = N(1, 1.5²). Proposition 1: the discriminator trained on samples approaches
    D*(x) = p_data / (p_data + p_g) (max error < 0.02 where both densities exceed 0.05). Theorem 1:
    V(D*, G) = -log 4 + 2 JSD(p_data ‖ p_g) > -log 4, and the trained D's value is within 0.005 of it."""
    d = trained_discriminator((0.0, 1.0), (1.0, 1.5), seed)
    x = torch.linspace(-12.0, 14.0, 20_001, dtype=torch.float64)
    p_data, p_g = normal_pdf(x, 0.0, 1.0), normal_pdf(x, 1.0, 1.5)
    d_star = optimal_discriminator(p_data, p_g)
    with torch.no_grad():
        d_trained = torch.sigmoid(d(x[:, None].float())).squeeze(-1).double()
    bulk = (p_data > 0.05) & (p_g > 0.05)
    error = float((d_trained - d_star)[bulk].abs().max())
    c_of_g, jsd = value(d_star, p_data, p_g, x), jensen_shannon(p_data, p_g, x)
    print(f"max |D - D*| {error:.4f} on [{float(x[bulk].min()):.2f}, {float(x[bulk].max()):.2f}]; "
          f"C(G) {c_of_g:.5f} = -log 4 + 2 x {jsd:.5f}; V(trained D) {value(d_trained, p_data, p_g, x):.5f}")
    assert error < 0.02
    assert math.isclose(c_of_g, -LOG_4 + 2 * jsd, abs_tol=1e-9) and jsd > 0.05
    assert c_of_g - 0.005 < value(d_trained, p_data, p_g, x) <= c_of_g + 1e-9  # D* is the maximum


def test_when_p_g_equals_p_data_the_best_discriminator_is_one_half_and_max_V_is_minus_log_4() -> None:
    """Theorem 1's global optimum: with p_g = p_data, D* = 1/2 everywhere and max_D V = -log 4."""
    d = trained_discriminator((0.5, 1.2), (0.5, 1.2), seed=2)
    x = torch.linspace(-10.0, 11.0, 20_001, dtype=torch.float64)
    p = normal_pdf(x, 0.5, 1.2)
    with torch.no_grad():
        d_trained = torch.sigmoid(d(x[:, None].float())).squeeze(-1).double()
    assert float((d_trained - 0.5)[p > 0.05].abs().max()) < 0.02
    assert torch.equal(optimal_discriminator(p, p), torch.full_like(p, 0.5))
    assert math.isclose(value(torch.full_like(p, 0.5), p, p, x), -LOG_4, abs_tol=1e-9)
    assert -LOG_4 - 0.002 < value(d_trained, p, p, x) <= -LOG_4 + 1e-9


# -- the losses ------------------------------------------------------------------------------------------
def test_the_losses_are_the_value_function_written_out() -> None:
    """-V = -(mean log D(x) + mean log(1 - D(G(z)))); non-saturating -mean log D(G(z)); minimax
    mean log(1 - D(G(z))), in float64 from σ written out; and finite where σ underflows in float32."""
    g = torch.Generator().manual_seed(0)
    real = 3 * torch.randn(64, generator=g, dtype=torch.float64)  # D's logits on 64 real and 48 generated images
    fake = 3 * torch.randn(48, generator=g, dtype=torch.float64)
    d_real, d_fake = 1 / (1 + torch.exp(-real)), 1 / (1 + torch.exp(-fake))  # D = σ(a)
    v = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()
    torch.testing.assert_close(discriminator_loss(real, fake), -v, rtol=0, atol=1e-12)
    torch.testing.assert_close(generator_loss(fake, "non_saturating"), -torch.log(d_fake).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(generator_loss(fake, "minimax"), torch.log(1 - d_fake).mean(), rtol=0, atol=1e-12)
    extreme = torch.tensor([-200.0, 200.0])  # σ(-200) = 0 and σ(200) = 1 in float32: the naive logs are -inf
    assert torch.isinf(torch.log(torch.sigmoid(extreme))).any()
    for loss in (discriminator_loss(extreme, extreme), generator_loss(extreme), generator_loss(extreme, "minimax")):
        assert torch.isfinite(loss)
    assert math.isclose(float(generator_loss(torch.tensor([-200.0]))), 200.0, rel_tol=1e-6)  # -log σ(-200) = 200


def test_the_non_saturating_loss_pushes_g_hard_where_the_minimax_loss_saturates() -> None:
    """§3: where D rejects G's samples (D(G(z)) = 10⁻³), the minimax loss's gradient with respect to D's logit
    (all that reaches G) is -D ≈ -10⁻³, the non-saturating one's -(1 - D) ≈ -1: ~1,000 times stronger, in the
    same direction. At D = 1/2 (the optimum of Theorem 1) the two gradients are equal."""
    def gradient(d_of_g: float, kind: str) -> float:
        a = torch.tensor([math.log(d_of_g / (1 - d_of_g))], dtype=torch.float64, requires_grad=True)  # σ(a) = D
        generator_loss(a, kind).backward()
        return float(a.grad)

    weak, strong = gradient(1e-3, "minimax"), gradient(1e-3, "non_saturating")
    assert math.isclose(weak, -1e-3, rel_tol=1e-9) and math.isclose(strong, -(1 - 1e-3), rel_tol=1e-9)
    assert strong / weak > 500
    assert math.isclose(gradient(0.5, "minimax"), gradient(0.5, "non_saturating"), rel_tol=1e-12)


def test_the_score_is_one_for_one_repeated_class_and_k_for_k_confident_classes_equally_often() -> None:
    """exp(E KL(p(y|x) ‖ p(y))): 1 when every image gets the same distribution, k for sharp predictions
    spread evenly over k classes; the coverage counts the classes the predictions fall into."""
    one_hot = torch.eye(10)
    assert math.isclose(inception_score(one_hot.repeat(50, 1)), 10.0, rel_tol=1e-9)  # 500 images, all 10 digits
    assert math.isclose(inception_score(one_hot[:4].repeat(25, 1)), 4.0, rel_tol=1e-9)
    assert math.isclose(inception_score(one_hot[3:4].repeat(100, 1)), 1.0, rel_tol=1e-9)  # mode collapse
    assert math.isclose(inception_score(torch.full((100, 10), 0.1)), 1.0, rel_tol=1e-9)  # no digit recognisable
    assert math.isclose(class_coverage(one_hot[:4].repeat(25, 1)), 4.0, rel_tol=1e-9)
    assert math.isclose(class_coverage(one_hot[3:4].repeat(100, 1)), 1.0, rel_tol=1e-9)


# -- the engine's promises ------------------------------------------------------------------------------
QUICK = ["task.classifier_steps=20", "task.classifier_hidden=[16]", "task.eval_samples=64", "task.sample_images=16",
         "data.train_examples=512", "data.val_examples=256", "trainer.batch_size=16", "trainer.log_every=1",
         "trainer.eval_every=0", "trainer.sample_every=-1", "trainer.progress=none", "trainer.plot=false",
         "trainer.tensorboard=false", "trainer.checkpoint_every=0"]


def logged(run_dir: Path, key: str) -> list[float]:
    return [e[key] for e in read_metrics(run_dir / "metrics.jsonl") if key in e]


@pytest.mark.parametrize("k", [1, 2])
def test_k_discriminator_updates_then_one_generator_update_each_moving_only_its_player(tmp_path: Path, k: int) -> None:
    """Algorithm 1 through the engine's named optimizers: the step calls the discriminator's k times, then
    the generator's; each moves only its own player's weights; no gradient is left over afterwards (the
    generator's loss reached D's weights too, and those gradients are dropped)."""
    trainer = Trainer(load_config(CONFIG, [*QUICK, f"task.k={k}", "trainer.max_steps=1"]), tmp_path)
    trainer.setup()
    try:
        ctx, model, calls = trainer.ctx, trainer.raw_model, []
        step = ctx.optimizer_step

        def recording(name=None, **options):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            norm = step(name, **options)
            moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
            calls.append((name, moved))
            return norm

        ctx.optimizer_step = recording
        trainer.train_step()
        assert calls == [("discriminator", {"discriminator"})] * k + [("generator", {"generator"})]
        assert all(p.grad is None for p in model.parameters())
    finally:
        trainer._close()


def test_a_resumed_run_continues_bit_for_bit(tmp_path: Path) -> None:
    """4 steps straight == 2, a fresh Trainer and process state, then 2 more: both optimizers' states, the
    dropout generator and the step-seeded noise come back exactly."""
    Trainer(load_config(CONFIG, [*QUICK, "trainer.max_steps=4"]), tmp_path / "straight").run()
    halfway = load_config(CONFIG, [*QUICK, "trainer.max_steps=2", "trainer.checkpoint_every=2"])
    Trainer(halfway, tmp_path / "resumed").run()
    torch.manual_seed(99)
    Trainer(load_config(CONFIG, [*QUICK, "trainer.max_steps=4"]), tmp_path / "resumed").run()
    for key in ("train/loss", "train/d_loss", "train/d_real", "train/d_fake"):
        straight, resumed = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
        assert len(straight) == 4 and straight == resumed, key
    score = "val/inception_score"
    assert logged(tmp_path / "straight", score)[-1] == logged(tmp_path / "resumed", score)[-1]


def train_rank(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(CONFIG, overrides), Path(run_dir)).run()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_compute_what_one_process_computes(tmp_path: Path, strategy: str) -> None:
    """The same global batch and the same noise (drawn for the whole batch, each rank keeping its rows) on 1
    process and on 2 gloo ranks: the same losses and scores to float rounding. (Dropout off: each rank draws
    its own masks.) The final samples run too: under FSDP2 every rank runs the sharded generator."""
    steps = [*QUICK, "model.dropout=0", "trainer.max_steps=4", "trainer.sample_every=0"]
    train_rank(str(tmp_path / "one"), steps)
    run_ranks(2, train_rank, str(tmp_path / "two"), [*steps, f"strategy={strategy}"])
    for key in ("train/loss", "train/d_loss", "train/d_real", "train/d_fake"):
        one, two = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        print(f"{strategy} {key}: largest difference {max(abs(a - b) for a, b in zip(one, two)):.2e}")
        assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (key, one, two)
    one, two = logged(tmp_path / "one", "val/inception_score"), logged(tmp_path / "two", "val/inception_score")
    assert math.isclose(one[-1], two[-1], abs_tol=1e-4), (one, two)
    assert (tmp_path / "two" / "samples" / "step_00000004_digits.png").is_file()


def test_deepspeed_and_a_misspelt_generator_loss_are_refused_before_any_work(capsys: pytest.CaptureFixture) -> None:
    from papertrain.cli import main

    assert main(["validate", "gan", "strategy=deepspeed"]) == 2
    assert "cannot run under strategy=deepspeed" in capsys.readouterr().err
    assert main(["validate", "gan", "task.generator_loss=non-saturating"]) == 2
    assert "non_saturating" in capsys.readouterr().err


# -- learning -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_generator_learns_digits_an_mnist_classifier_recognises(tmp_path: Path) -> None:
    """The tiny config's settings, stopped once the classifier's score of 1,000 generated digits reaches 3
    (around step 750, where they cover at least 4 classes' worth); the untrained generator scores ~1.0:
    one grey blob, always the same class. (A 500-step classifier, to keep the test short.)"""
    goal = "callbacks.goal={_component_: papertrain.callbacks.StopAtGoal, metric: val/inception_score, at_least: 3.0}"
    config = load_config(CONFIG, [goal, "task.classifier_steps=500", "trainer.eval_every=250",
                                  "trainer.sample_every=-1", "trainer.checkpoint_every=0", "trainer.progress=none",
                                  "trainer.plot=false", "trainer.tensorboard=false"])
    trainer = Trainer(config, tmp_path)
    result = trainer.run()
    scores = logged(tmp_path, "val/inception_score")
    torch.manual_seed(config.run.seed)
    with torch.no_grad():
        untrained = trainer.task.evaluate_all(SimpleNamespace(raw_model=config.build("model").eval(),
                                                              device=torch.device("cpu")))
    print(f"scores by evaluation: {scores}, stopped at step {result.step}; untrained {untrained['inception_score']:.3f}; "
          f"classifier accuracy {result.metrics['val/classifier_accuracy']:.4f}")
    assert untrained["inception_score"] < 1.2 and untrained["class_coverage"] < 2
    assert scores[-1] >= 3.0 and result.metrics["val/class_coverage"] >= 4 and result.step < 6000
