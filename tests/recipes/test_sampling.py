"""Decoding strategies keep exactly what their definitions say, sample the renormalised distribution,
and reproduce Holtzman et al.'s finding on a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.recipes.lm.sampling.model import Sampler, generate, greedy, nucleus_filter, top_k_filter
from papertrain.recipes.lm.sampling.task import distinct_n
from papertrain.trainer import Trainer


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    logits = torch.randn(16, 50)
    kept = torch.isfinite(top_k_filter(logits, k))
    assert (kept.sum(-1) == k).all()
    for row, mask in zip(logits, kept):
        assert set(row.argsort(descending=True)[:k].tolist()) == set(mask.nonzero().flatten().tolist())


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_keeps_smallest_set_with_mass_p(p: float) -> None:
    logits = torch.randn(64, 40) * 2
    kept = torch.isfinite(nucleus_filter(logits, p))
    probs = logits.double().softmax(-1).numpy()
    for row, mask in zip(probs, kept.numpy()):
        order = np.argsort(-row)
        cumulative = np.cumsum(row[order])
        size = int(np.searchsorted(cumulative, p) + 1)  # fewest most-likely tokens with mass >= p
        assert set(order[:size]) == set(np.flatnonzero(mask))
        assert row[mask].sum() >= p - 1e-9 and row[mask].sum() - row[mask].min() < p


def test_temperature_towards_zero_is_greedy() -> None:
    logits = torch.randn(200, 30) * 3
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(Sampler(temperature=0.0)(logits), greedy(logits))
    assert torch.equal(Sampler(temperature=1e-4)(logits, generator), greedy(logits))


@pytest.mark.parametrize("settings", [{"temperature": 0.7, "top_k": 4}, {"top_p": 0.8}, {"temperature": 1.5}])
def test_draws_follow_the_renormalised_distribution(settings: dict) -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -2.0])
    temperature, k, p = settings.get("temperature", 1.0), settings.get("top_k"), settings.get("top_p")
    # the expected distribution, computed independently in float64
    probs = np.exp(logits.double().numpy() / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.ones(6, dtype=bool)
    if k is not None:
        keep[order[k:]] = False
    if p is not None:
        size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
        keep[order[size:]] = False
    expected = np.where(keep, probs, 0.0)
    expected /= expected.sum()

    draws = Sampler(**settings)(logits.expand(200_000, 6), torch.Generator().manual_seed(1))
    frequencies = np.bincount(draws.numpy(), minlength=6) / 200_000
    standard_error = np.sqrt(expected * (1 - expected) / 200_000)
    assert (np.abs(frequencies - expected) <= 4 * standard_error + 1e-12).all(), (frequencies, expected)


def test_invalid_settings_are_rejected() -> None:
    for bad in ({"temperature": -1}, {"top_k": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampler(**bad)


def test_generate_extends_the_prompt_reproducibly() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    prompt = torch.randint(0, 11, (2, 3))
    sampler = Sampler(temperature=1.0)
    a = generate(model, prompt, 5, sampler, torch.Generator().manual_seed(3), context_size=4)
    b = generate(model, prompt, 5, sampler, torch.Generator().manual_seed(3), context_size=4)
    assert a.shape == (2, 8) and torch.equal(a[:, :3], prompt) and torch.equal(a, b)


def test_distinct_n_counts_unique_word_pairs() -> None:
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5)
    assert distinct_n("to be or not to be") == pytest.approx(4 / 5)


def test_greedy_degenerates_on_a_trained_model(tmp_path: Path) -> None:
    """Holtzman et al. §3: greedy text is the most likely and the most repetitive; pure sampling the least
    likely; nucleus sampling sits between them."""
    config = load_config(RECIPES / "lm/sampling/tiny.yaml", [
        "trainer.max_steps=250", "model.n_layers=2", "model.d_model=64", "data.block_size=64",
        "task.prompts=4", "task.prompt_tokens=32", "task.continuation_tokens=96", "trainer.progress=none",
        "trainer.tensorboard=false", "trainer.plot=false", "trainer.eval_batches=4"])
    result = Trainer(config, tmp_path / "run").run()
    m = result.metrics
    assert m["sample/greedy/log_likelihood"] > m["sample/nucleus_0.9/log_likelihood"] > m["sample/pure/log_likelihood"]
    assert m["sample/greedy/distinct_2"] < m["sample/nucleus_0.9/distinct_2"]
    assert m["sample/greedy/distinct_2"] < m["sample/human/distinct_2"]
    comparison = (tmp_path / "run/samples/step_00000250.txt").read_text()
    assert "=== comparison ===" in comparison and "nucleus_0.9" in comparison
