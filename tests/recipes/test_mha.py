"""Multi-head attention equals torch's SDPA and nn.MultiheadAttention, and learns a dictionary lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPES
from papertrain.config import instantiate, load_config
from papertrain.recipes.transformers.mha.model import MultiHeadAttention, attention, causal_mask
from papertrain.recipes.transformers.mha.task import DictionaryLookup, LookupTask
from papertrain.trainer import Trainer


def random_mask(b: int, t_q: int, t_k: int) -> torch.Tensor:
    mask = torch.rand(b, 1, t_q, t_k) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    return mask


@pytest.mark.parametrize("t_q, t_k", [(5, 5), (3, 9), (9, 4)])
def test_equation_one_equals_sdpa(t_q: int, t_k: int) -> None:
    q, k, v = torch.randn(2, 3, t_q, 8), torch.randn(2, 3, t_k, 8), torch.randn(2, 3, t_k, 16)
    ours, _ = attention(q, k, v)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)
    mask = random_mask(2, t_q, t_k)
    ours, _ = attention(q, k, v, mask)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=1e-5)


def test_causal_mask_aligns_queries_with_the_last_keys() -> None:
    # 3 queries over 5 keys: the queries are positions 2, 3, 4
    expected = torch.ones(3, 5).tril(diagonal=2).bool()
    assert torch.equal(causal_mask(3, 5), expected)
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4).tril().bool())


def test_weights_are_distributions_and_masked_keys_get_none() -> None:
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = random_mask(2, 4, 6)
    _, weights = attention(q, k, v, mask)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 4))
    assert (weights[~mask.expand_as(weights)] == 0).all()


@pytest.mark.parametrize("d_k", [16, 256])
def test_scaling_keeps_scores_at_unit_variance(d_k: int) -> None:
    """§3.2.1: q·k of unit-variance vectors has variance d_k; dividing by √d_k brings it back to 1."""
    q, k = torch.randn(20_000, d_k), torch.randn(20_000, d_k)
    scores = (q * k).sum(-1) / d_k ** 0.5
    assert abs(float(scores.var()) - 1.0) < 0.05


def torch_twin(ours: MultiHeadAttention) -> torch.nn.MultiheadAttention:
    twin = torch.nn.MultiheadAttention(ours.d_model, ours.n_heads, batch_first=True)
    with torch.no_grad():
        twin.in_proj_weight.copy_(ours.qkv_proj.weight)
        twin.in_proj_bias.copy_(ours.qkv_proj.bias)
        twin.out_proj.weight.copy_(ours.out_proj.weight)
        twin.out_proj.bias.copy_(ours.out_proj.bias)
    return twin.eval()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_module_equals_torch_multihead_attention(backend: str) -> None:
    ours = MultiHeadAttention(32, 4, backend=backend).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)  # biases too: a zero bias would hide a mis-mapped one
    twin = torch_twin(ours)
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 9, 32)

    torch.testing.assert_close(ours(x), twin(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x, memory, memory), twin(x, memory, memory, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)

    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 5:], padding[2, 1:] = True, True  # torch: True = ignore this key
    expected = twin(x, memory, memory, key_padding_mask=padding, need_weights=False)[0]
    got = ours(x, memory, memory, mask=~padding[:, None, None, :])  # ours: True = may attend
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    future = torch.ones(6, 6).triu(diagonal=1).bool()
    expected = twin(x, x, x, attn_mask=future, need_weights=False)[0]
    torch.testing.assert_close(ours(x, causal=True), expected, atol=1e-5, rtol=1e-5)

    out, weights = ours(x, memory, memory, need_weights=True)
    ref_out, ref_weights = twin(x, memory, memory, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_dictionary_lookup_is_learned(tmp_path: Path) -> None:
    config = load_config(RECIPES / "transformers/mha/tiny.yaml",
                         ["trainer.max_steps=250", "data.n_train=20000", "trainer.progress=none",
                          "trainer.tensorboard=false", "trainer.plot=false"])
    data = DictionaryLookup(n_train=20000, n_val=2000)
    untrained = LookupTask().evaluate(instantiate(config.run.model).eval(), data.val.batch(torch.arange(2000)))
    assert untrained["accuracy"] < 0.2  # chance is 1/16
    result = Trainer(config, tmp_path / "run").run()
    assert result.metrics["val/accuracy"] > 0.9
    assert (tmp_path / "run/samples/step_00000250_attention.png").is_file()
