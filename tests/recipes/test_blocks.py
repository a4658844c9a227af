"""The building blocks equal torch.nn's Transformer layers, the sinusoids have the paper's relative-position
property, and the assembled encoder-decoder learns to sort."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import RECIPES
from papertrain.config import instantiate, load_config
from papertrain.recipes.transformers.blocks.model import (DecoderLayer, EncoderDecoder, TransformerLayer,
                                                          padding_mask, sinusoidal_table)
from papertrain.recipes.transformers.blocks.task import EOS, PAD, SortDigits, SortTask
from papertrain.trainer import Trainer


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


def copy_attention(ours, theirs) -> None:
    theirs.in_proj_weight.copy_(ours.qkv_proj.weight)
    theirs.in_proj_bias.copy_(ours.qkv_proj.bias)
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_ffn_and_norms(ours, theirs, norms: int) -> None:
    theirs.linear1.load_state_dict(ours.ffn.linear1.state_dict())
    theirs.linear2.load_state_dict(ours.ffn.linear2.state_dict())
    for i in range(1, norms + 1):
        getattr(theirs, f"norm{i}").load_state_dict(getattr(ours, f"norm{i}").state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_equals_torch(norm_first: bool) -> None:
    ours = TransformerLayer(32, 4, 64, dropout=0.0, norm_first=norm_first)
    randomise(ours)
    theirs = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        copy_attention(ours.attention, theirs.self_attn)
        copy_ffn_and_norms(ours, theirs, norms=2)
    # train() with dropout 0 keeps torch off its nested-tensor fast path, which zeroes padded rows
    ours.train(), theirs.train()
    x = torch.randn(3, 7, 32)
    tokens = torch.ones(3, 7, dtype=torch.long)
    tokens[0, 4:], tokens[1, 6:] = PAD, PAD
    expected = theirs(x, src_key_padding_mask=tokens == PAD)
    torch.testing.assert_close(ours(x, mask=padding_mask(tokens, PAD)), expected, atol=1e-5, rtol=1e-5)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    torch.testing.assert_close(ours(x, causal=True), theirs(x, src_mask=causal, is_causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_torch(norm_first: bool) -> None:
    ours = DecoderLayer(32, 4, 64, dropout=0.0, norm_first=norm_first)
    randomise(ours)
    theirs = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        copy_attention(ours.self_attention, theirs.self_attn)
        copy_attention(ours.cross_attention, theirs.multihead_attn)
        copy_ffn_and_norms(ours, theirs, norms=3)
    ours.train(), theirs.train()
    y, memory = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    source = torch.ones(2, 8, dtype=torch.long)
    source[1, 3:] = PAD
    expected = theirs(y, memory, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
                      memory_key_padding_mask=source == PAD)
    torch.testing.assert_close(ours(y, memory, memory_mask=padding_mask(source, PAD)), expected, atol=1e-5, rtol=1e-5)


def test_sinusoids_follow_the_formula() -> None:
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 17, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_a_shift_of_k_positions_is_the_same_rotation_everywhere() -> None:
    """§3.5: PE(pos + k) is a linear function of PE(pos) that depends on k only."""
    d, k = 16, 7
    table = sinusoidal_table(100, d).double()
    omega = 10000 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rotation = torch.zeros(d, d, dtype=torch.float64)
    for i, w in enumerate(omega):  # [sin(a+b), cos(a+b)] = [[cos b, sin b], [-sin b, cos b]] [sin a, cos a]
        c, s = math.cos(k * w), math.sin(k * w)
        rotation[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    for pos in (0, 5, 40, 90):
        torch.testing.assert_close(rotation @ table[pos], table[pos + k], atol=1e-5, rtol=0)


def test_embeddings_and_output_share_weights() -> None:
    model = EncoderDecoder(vocab_size=13, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    assert model.output.weight is model.embed.embedding.weight


def test_sort_data_is_sorted_and_terminated() -> None:
    data = SortDigits(n_train=100, n_val=10)
    batch = data.train.batch(torch.arange(100))
    for source, out in zip(batch["source"], batch["target_out"]):
        symbols = sorted(int(t) for t in source if t != PAD)
        length = len(symbols)
        assert out[:length].tolist() == symbols and int(out[length]) == EOS


def test_encoder_decoder_learns_to_sort(tmp_path: Path) -> None:
    config = load_config(RECIPES / "transformers/blocks/tiny.yaml",
                         ["trainer.max_steps=300", "data.n_train=20000", "data.n_val=256", "trainer.eval_batches=4",
                          "trainer.progress=none", "trainer.tensorboard=false", "trainer.plot=false"])
    data = SortDigits(n_train=10, n_val=256)
    model = instantiate(config.run.model).eval()
    untrained = SortTask().evaluate(model, data.val.batch(torch.arange(256)))
    assert untrained["token_accuracy"] < 0.3
    result = Trainer(config, tmp_path / "run").run()
    assert result.metrics["val/token_accuracy"] > 0.6
