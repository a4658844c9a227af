"""LLM.int8(): absmax quantisation is within half a step, the int8 product is exact, vector-wise int8 is
close to fp32, the mixed-precision decomposition rescues the outlier features that break plain int8, our
layer agrees with bitsandbytes', and gradients reach the input and bias of the frozen int8 layer."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.quantization.llm_int8.model import (
    FP32_EXACT_TERMS, THRESHOLD, Int8Linear, dequantize_rows, int8_matmul, outlier_dims, quantize_linears,
    quantize_rows)
from papertrain.recipes.transformers.gpt.model import GPT
from papertrain.trainer import Trainer


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y - reference).detach().norm() / reference.detach().norm())


def linear_and_inputs(in_features: int = 512, out_features: int = 256, tokens: int = 64, seed: int = 0
                      ) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer with trained-looking weights (N(0, 0.02)) and N(0, 1) hidden states, like a
    LayerNorm output: the regime of a transformer's projections without emergent features."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.normal_(linear.bias, std=0.02)
    return linear, torch.randn(tokens, in_features)


def plant_outlier_features(x: torch.Tensor, dims: list[int], seed: int = 1) -> torch.Tensor:
    """§4's emergent features: a few feature dimensions with magnitudes 20-60 in *every* token."""
    generator = torch.Generator().manual_seed(seed)
    x = x.clone()
    magnitudes = 20 + 40 * torch.rand(x.shape[0], len(dims), generator=generator)
    signs = torch.randint(0, 2, (x.shape[0], len(dims)), generator=generator) * 2 - 1
    x[:, dims] = magnitudes * signs
    return x


# --- §2.1 / §3.1: absmax quantisation and the int8 product ------------------------------------------------

def test_absmax_round_trip_is_within_half_a_step_per_row() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 300) * torch.logspace(-3, 3, 200)[:, None]  # rows of very different scale
    x[7] = 0.0  # an all-zero row must not divide by zero
    x_i8, absmax = quantize_rows(x)
    assert x_i8.dtype == torch.int8 and absmax.shape == (200,)
    assert x_i8.abs().max() <= 127 and (x_i8[absmax > 0].abs().amax(dim=1) == 127).all()  # each row uses the grid
    error = (dequantize_rows(x_i8, absmax) - x).abs()
    step = absmax[:, None] / 127
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert (error[7] == 0).all()
    # and the bound is tight: uniform values land anywhere within a step, so some error is close to half of it
    assert (error / step.clamp_min(1e-30)).max() > 0.49


@pytest.mark.parametrize("n, k, m", [(1, 1, 1), (17, 64, 33), (5, FP32_EXACT_TERMS, 7), (9, 5000, 6)])
def test_int8_matmul_is_the_exact_integer_product(n: int, k: int, m: int) -> None:
    generator = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    product = int8_matmul(a, b)
    assert product.dtype == torch.int32 and product.shape == (n, m)
    assert torch.equal(product.long(), a.long() @ b.long().T)
    assert torch.equal(product, torch._int_mm(a, b.T.contiguous()))  # torch's own int8 x int8 -> int32 kernel


def test_float32_alone_would_round_long_int8_products() -> None:
    """Why int8_matmul accumulates blocks of <= 1040 terms in int32: one float32 matmul over 20,000 extreme
    terms produces sums beyond 2^24 that float32 cannot hold exactly."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(100, 128, (4, 20_000), dtype=torch.int8, generator=generator)
    b = torch.randint(100, 128, (4, 20_000), dtype=torch.int8, generator=generator)
    exact = a.long() @ b.long().T
    assert not torch.equal((a.float() @ b.float().T).long(), exact)
    assert torch.equal(int8_matmul(a, b).long(), exact)


# --- §3.1 / §3.2: the int8 layer against fp32 -------------------------------------------------------------

def test_vector_wise_int8_error_is_what_rounding_predicts_without_outliers() -> None:
    linear, x = linear_and_inputs()
    reference = linear(x)
    layer = Int8Linear.from_linear(linear)
    assert not outlier_dims(x).any()  # N(0, 1) hidden states: nothing reaches α = 6
    y = layer(x)
    error = (y - reference).detach()
    # The worst case: with |δx_j| <= c_x/254 and |δw_j| <= c_w/254 (half a step each),
    #   |ŷ − y| <= Σ_j (|x_j| c_w + |w_j| c_x) / 254 + K c_x c_w / 254²      for every output
    w = linear.weight.detach()
    c_x, c_w = x.abs().amax(dim=1), w.abs().amax(dim=1)  # [tokens], [out]
    bound = (x.abs().sum(1, keepdim=True) * c_w / 254 + c_x[:, None] * w.abs().sum(1) / 254
             + x.shape[1] * c_x[:, None] * c_w / 254**2)  # [tokens, out]
    assert (error.abs() <= bound * (1 + 1e-4)).all()
    # The typical case: rounding errors are uniform on ±half a step (variance step²/12) and independent, so
    #   E|ŷ − y|² / E|y|² = (E[c_x² / x_rms²] + E[c_w² / w_rms²]) / (12 · 127²)
    # (about 1 % here: a Gaussian row's absmax is ~3.3 times its rms, in 512 features).
    predicted = math.sqrt((float((c_x**2 / x.pow(2).mean(1)).mean()) + float((c_w**2 / w.pow(2).mean(1)).mean()))
                          / (12 * 127**2))
    measured = float(error.norm() / (reference - linear.bias).detach().norm())
    assert 0.85 * predicted < measured < 1.15 * predicted, (measured, predicted)


def test_decomposition_rescues_outlier_features_that_break_plain_int8() -> None:
    """The paper's central claim (§3.2): a few outlier feature dimensions ruin vector-wise int8,
    because every token's scale c_x stretches to its outlier (here ~50 instead of ~3.3, so 15x coarser
    steps for all other features); computing just those dimensions in 16-bit restores the error of
    outlier-free inputs."""
    linear, x = linear_and_inputs()
    x_out = plant_outlier_features(x, dims=[3, 101, 400])
    assert outlier_dims(x_out).nonzero().flatten().tolist() == [3, 101, 400]
    decomposed_layer = Int8Linear.from_linear(linear, threshold=THRESHOLD)
    plain_layer = Int8Linear.from_linear(linear, threshold=math.inf)
    decomposed, plain = decomposed_layer(x_out), plain_layer(x_out)

    # against fp32: the decomposition stays within the ~1 % of clean inputs, plain int8 is far off
    reference = linear(x_out)
    assert relative_error(decomposed, reference) < 1e-2
    assert relative_error(plain, reference) > 3 * relative_error(decomposed, reference)

    # the activations' share of the error, measured against the same (dequantised) int8 weights: with the
    # decomposition it is what it is on the clean inputs, without it 10x more
    def activation_error(layer: Int8Linear, inputs: torch.Tensor) -> float:
        exact = inputs @ layer.dequantized_weight().T + layer.bias
        return float((layer(inputs) - exact).detach().norm())

    clean = activation_error(decomposed_layer, x)
    assert 0.8 * clean < activation_error(decomposed_layer, x_out) < 1.25 * clean
    assert activation_error(plain_layer, x_out) > 10 * clean

    # the outlier dimensions themselves are never rounded: a nudge far below one int8 step of the plain
    # scheme moves the output by exactly nudge · W_{:, j} (the dequantised weight column)
    nudged = x_out.clone()
    nudged[:, 3] += 0.01
    delta = (decomposed_layer(nudged) - decomposed).detach()
    expected = 0.01 * decomposed_layer.dequantized_weight()[:, 3]
    assert torch.allclose(delta, expected.expand_as(delta), atol=1e-6)


def test_threshold_must_be_positive() -> None:
    linear, _ = linear_and_inputs(8, 4)
    with pytest.raises(ValueError, match="math.inf"):
        Int8Linear.from_linear(linear, threshold=0.0)


# --- against bitsandbytes ----------------------------------------------------------------------------------

def bitsandbytes_layer(linear: nn.Linear, threshold: float) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(linear)).eval()  # eval: bitsandbytes' int8 inference path on CPU
    report = quantize_linears(model, backend="bitsandbytes", threshold=threshold, skip=())
    assert report.converted == ["0"]
    return model[0]


def test_same_int8_weights_and_outputs_as_bitsandbytes() -> None:
    """bitsandbytes rounds weights and activations to float16 before quantising them. On float16-exact
    values the two implementations quantise identically, so the outputs agree up to float summation
    order and bitsandbytes' dequantisation constant 6.200124e-05 for 1/127² (1.8e-5 relative too big)."""
    pytest.importorskip("bitsandbytes")
    linear, x = linear_and_inputs()
    with torch.no_grad():
        linear.weight.copy_(linear.weight.half().float())
    x = plant_outlier_features(x, dims=[3, 101, 400]).half().float()
    ours = Int8Linear.from_linear(linear)
    theirs = bitsandbytes_layer(linear, THRESHOLD)
    assert torch.equal(theirs.weight.data, ours.weight)  # W_i8, the same integers
    assert torch.equal(theirs.weight.SCB, ours.weight_absmax)  # c_w
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-5 * y_ours.abs().max())
    assert relative_error(y_ours, y_theirs) < 3e-5


def test_close_to_bitsandbytes_on_float32_inputs() -> None:
    """On arbitrary float32 values the float16 detour changes a few int8 codes by one, and bitsandbytes
    takes each token's scale over the sub-threshold values of outlier columns too (we take it over the
    int8 columns only): the outputs then differ by less than either differs from fp32."""
    pytest.importorskip("bitsandbytes")
    linear, x = linear_and_inputs()
    x = plant_outlier_features(x, dims=[3, 101, 400])
    x[::2, 3] = 1.0  # the outlier column is below α in half the tokens
    reference = linear(x)
    with torch.no_grad():
        y_ours, y_theirs = Int8Linear.from_linear(linear)(x), bitsandbytes_layer(linear, THRESHOLD)(x)
    ours_error, theirs_error = relative_error(y_ours, reference), relative_error(y_theirs, reference)
    assert ours_error < 1e-2 and theirs_error < 1e-2
    assert relative_error(y_ours, y_theirs) < min(ours_error, theirs_error)


# --- a whole model -----------------------------------------------------------------------------------------

def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=65, block_size=32, n_layers=2, n_heads=4, d_model=128, dropout=0.0,
               norm_first=True).eval()


@pytest.mark.parametrize("backend", ["own", "bitsandbytes"])
def test_quantize_linears_converts_a_gpt_but_its_tied_head(backend: str) -> None:
    if backend == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    model = small_gpt()
    ids = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids)
    quantized = copy.deepcopy(model)
    report = quantize_linears(quantized, backend=backend)
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("attention.qkv_proj", "attention.out_proj",
                                                          "ffn.linear1", "ffn.linear2")]
    assert sorted(report.converted) == sorted(names) and report.skipped == ["lm_head"]
    plain = [n for n, m in quantized.named_modules() if type(m) is nn.Linear]
    assert plain == ["lm_head"] and quantized.lm_head.weight is quantized.token_embedding.weight
    # bytes measured from the tensors: 4 per fp32 parameter before, int8 + per-row scale and bias after
    assert report.parameters == sum(p.numel() for n, p in model.named_parameters()
                                    if any(n.startswith(c + ".") for c in names))
    assert report.bytes_per_parameter_before == 4.0
    assert report.bytes_per_parameter_after <= 1.1
    with torch.no_grad():
        logits = quantized(ids)
    assert relative_error(logits, reference) < 2e-2
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_own_report_counts_every_byte() -> None:
    linear = nn.Linear(128, 64)
    model = nn.Sequential(linear)
    report = quantize_linears(model, skip=())
    # before: 64x128 + 64 float32; after: 64x128 int8 + 64 float32 scales + 64 float32 biases
    assert report.bytes_before == (64 * 128 + 64) * 4
    assert report.bytes_after == 64 * 128 + 64 * 4 + 64 * 4
    assert report.parameters == 64 * 128 + 64


# --- training through the frozen int8 layer ------------------------------------------------------------------

def test_gradients_reach_input_and_bias_not_the_int8_weight() -> None:
    linear, x = linear_and_inputs()
    x = plant_outlier_features(x, dims=[3, 101, 400])
    layer = Int8Linear.from_linear(linear)
    assert [n for n, p in layer.named_parameters()] == ["bias"] and layer.bias.requires_grad
    assert {n for n, _ in layer.named_buffers()} == {"weight", "weight_absmax"}
    grad_y = torch.randn(x.shape[0], linear.out_features, generator=torch.Generator().manual_seed(3))

    x_int8 = x.clone().requires_grad_(True)
    layer(x_int8).backward(grad_y)
    x_fp32 = x.clone().requires_grad_(True)
    linear(x_fp32).backward(grad_y)

    # ∂L/∂X = ∂L/∂Y · W with the dequantised weight, exactly; within int8 weight error of fp32's gradient
    assert torch.allclose(x_int8.grad, grad_y @ layer.dequantized_weight(), rtol=1e-5, atol=1e-6)
    assert relative_error(x_int8.grad, x_fp32.grad) < 1e-2
    assert torch.allclose(layer.bias.grad, linear.bias.grad, rtol=1e-5, atol=1e-6)  # = Σ_tokens ∂L/∂y
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_biases_only_finetune_steps_through_the_int8_layer() -> None:
    linear, x = linear_and_inputs(64, 32, tokens=16)
    layer = Int8Linear.from_linear(linear)
    target = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    weight_before = layer.weight.clone()
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.equal(layer.weight, weight_before)


# --- errors a user can act on ---------------------------------------------------------------------------------

def test_unknown_backend_is_a_clear_error() -> None:
    model = small_gpt()
    with pytest.raises(PapertrainError) as info:
        quantize_linears(model, backend="bitsandbyte")
    assert "bitsandbyte" in info.value.message and "did you mean 'bitsandbytes'" in info.value.hint
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # nothing was converted


def test_missing_bitsandbytes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(PapertrainError) as info:
        quantize_linears(small_gpt(), backend="bitsandbytes")
    assert "pip install 'papertrain[int8]'" in info.value.hint


# --- the recipe's run ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_run_compares_fp32_int8_and_bitsandbytes(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    config = load_config(RECIPES / "quantization/llm_int8/tiny.yaml", [
        "trainer.max_steps=20", "trainer.batch_size=8", "model.n_layers=2", "data.block_size=64",
        "task.eval_windows=8", "task.eval_batch_size=8", "task.sample_tokens=8", "trainer.progress=none",
        "trainer.tensorboard=false", "trainer.plot=false", "trainer.eval_batches=2", "trainer.checkpoint_every=0"])
    m = Trainer(config, tmp_path / "run").run().metrics
    for name in ("int8", "int8_no_decomposition", "bitsandbytes"):
        assert abs(m[f"sample/{name}/val_loss_increase"]) < 0.01
        assert m[f"sample/{name}/bytes_per_param"] <= 1.1
    assert m["sample/fp32/bytes_per_param"] == 4.0
    assert m["sample/own_vs_bitsandbytes/max_rel_logit_diff"] < 5e-2
    # planted outlier features: the fp32 model is unchanged, plain int8 breaks, the decomposition does not
    assert m["sample/planted/fp32/max_rel_logit_error"] < 1e-4
    assert m["sample/planted/int8/outlier_dim_share"] > 0
    assert (m["sample/planted/int8_no_decomposition/mean_rel_logit_error"]
            > 3 * m["sample/planted/int8/mean_rel_logit_error"])
    assert "int8_no_decomposition" in (tmp_path / "run/samples/step_00000020.txt").read_text()
