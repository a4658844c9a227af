"""GPT equals Hugging Face's GPT-1 and GPT-2 on the same weights, is causal, and learns Shakespeare."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_GPT, gpt_config_path, learns, run_shipped
from papertrain.config import load_config
from papertrain.recipes.transformers.gpt.hf import from_hf_state_dict, save_hf_directory, to_hf_state_dict
from papertrain.recipes.transformers.gpt.model import GPT

transformers = pytest.importorskip("transformers")


def random_gpt(norm_first: bool, activation: str) -> GPT:
    model = GPT(vocab_size=101, block_size=24, n_layers=3, n_heads=4, d_model=48, dropout=0.0,
                norm_first=norm_first, activation=activation).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)  # LayerNorm gains and biases away from 1 and 0, so mapping errors show
    return model


@pytest.mark.parametrize("norm_first, activation, reference", [
    (True, "gelu_tanh", "GPT2LMHeadModel"),  # GPT-2: pre-norm, final LayerNorm, tanh GELU
    (False, "gelu", "OpenAIGPTLMHeadModel"),  # GPT-1: post-norm
])
def test_logits_equal_hugging_face_loaded_from_safetensors(tmp_path: Path, norm_first: bool, activation: str,
                                                          reference: str) -> None:
    ours = random_gpt(norm_first, activation)
    save_hf_directory(ours, tmp_path / "hf")
    theirs = getattr(transformers, reference).from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 101, (3, 24))
    with torch.no_grad():
        difference = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert difference <= 1e-4


def test_hf_layout_round_trips() -> None:
    model = random_gpt(True, "gelu")
    restored = GPT(vocab_size=101, block_size=24, n_layers=3, n_heads=4, d_model=48, norm_first=True)
    restored.load_state_dict(from_hf_state_dict(to_hf_state_dict(model), n_layers=3, flavour="gpt2"))
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_position_never_sees_the_future() -> None:
    model = random_gpt(True, "gelu")
    tokens = torch.randint(0, 101, (1, 24))
    changed = tokens.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 101
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[0, :15], b[0, :15])
    assert not torch.allclose(a[0, 15], b[0, 15])


def test_math_and_sdpa_attention_compute_the_same_model() -> None:
    model = random_gpt(False, "gelu")
    twin = GPT(vocab_size=101, block_size=24, n_layers=3, n_heads=4, d_model=48, dropout=0.0,
               attention_backend="math").eval()
    twin.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(model(tokens), twin(tokens), atol=1e-5, rtol=1e-5)


def test_gpt_learns_shakespeare_in_seconds(tmp_path: Path) -> None:
    config = load_config(gpt_config_path(), [*SMALL_GPT, "trainer.max_steps=300", "trainer.batch_size=16",
                                              "trainer.eval_batches=8"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.95 * math.log(65)  # about uniform over 65 characters
    assert trained < 2.8


@pytest.mark.slow
def test_the_tiny_config_reaches_its_goal(tmp_path: Path) -> None:
    """`papertrain run gpt` exactly as shipped: validation loss <= 2.0 nats/char, and a text sample."""
    assert run_shipped("gpt", tmp_path / "gpt")["val/loss"] <= 2.0
    sample = (tmp_path / "gpt/samples/step_00000800.txt").read_text()
    assert len(sample) > 400 and sample.count("\n") > 5
