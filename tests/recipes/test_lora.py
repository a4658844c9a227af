"""LoRA: starts at the base model, equals W₀ + (α/r)·B·A, merges without changing outputs, trains only A
and B, stores only A and B, and learns Shakespeare over a frozen GPT."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import RECIPES, learns, run_shipped
from papertrain.config import instantiate, load_config
from papertrain.errors import PapertrainError
from papertrain.recipes.finetune.lora.model import (LoRALinear, LoRAModel, apply_lora, load_adapter, lora_layers,
                                                    lora_state_dict, merge_lora, save_adapter, unmerge_lora)
from papertrain.recipes.transformers.gpt.model import GPT
from papertrain.trainer import Trainer, weight_decay_groups

CONFIG = RECIPES / "finetune" / "lora" / "tiny.yaml"
TARGETS = ["attention.qkv_proj", "attention.out_proj"]
SMALL_LORA = [
    "model.base.n_layers=1", "model.base.d_model=256", "model.base.n_heads=4", "data.block_size=32",
    "trainer.batch_size=16", "trainer.eval_batches=4", "trainer.log_every=10", "trainer.progress=none",
    "task.sample_tokens=16", "trainer.tensorboard=false", "trainer.plot=false", "trainer.checkpoint_every=0",
    "trainer.eval_every=0", "trainer.sample_every=0",
]


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=50, block_size=16, n_layers=2, n_heads=2, d_model=32, dropout=0.0, norm_first=True).eval()


def lora_gpt(seed: int = 0, r: int = 4, alpha: float = 8.0, targets: list[str] = TARGETS) -> LoRAModel:
    return LoRAModel(small_gpt(seed), r=r, alpha=alpha, targets=targets).eval()


def randomise_adapters(model: nn.Module, seed: int) -> None:
    """B = 0 hides every mistake in A; give both values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def tokens(seed: int, batch: int = 3, length: int = 16, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- eq. 3 ---------------------------------------------------------------------------------------------

def test_with_b_zero_the_adapted_model_is_exactly_the_base() -> None:
    base = small_gpt(seed=1)
    adapted = LoRAModel(copy.deepcopy(base), r=4, alpha=8, targets=TARGETS).eval()
    assert len(lora_layers(adapted)) == 4
    assert all(layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0 for layer in lora_layers(adapted))
    x = tokens(2)
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x))


def test_linear_adapter_equals_the_dense_update_w0_plus_alpha_over_r_ba() -> None:
    torch.manual_seed(3)
    base = nn.Linear(24, 40)
    w0, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, r=3, alpha=6.0)
    randomise_adapters(layer, seed=4)
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(5))
    # independent of the layer's code path: one dense matrix W₀ + (α/r) B A
    dense = w0 + (6.0 / 3) * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer(x), F.linear(x, dense, b), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_adapter_equals_the_dense_update() -> None:
    """transformers' Conv1D stores W as [in, out] and computes x W + b: ΔW must enter transposed."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(6)
    conv = Conv1D(nf=40, nx=24)  # 24 -> 40
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(7))
    expected_base = conv(x)
    w_in_out, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer = LoRALinear(conv, r=4, alpha=4.0)
    assert (layer.in_features, layer.out_features, layer.transposed) == (24, 40, True)
    torch.testing.assert_close(layer(x), expected_base, atol=1e-6, rtol=1e-6)  # B = 0: still Conv1D
    randomise_adapters(layer, seed=8)
    delta = (4.0 / 4) * layer.lora_B.detach() @ layer.lora_A.detach()  # [out, in]
    torch.testing.assert_close(layer(x), x @ (w_in_out + delta.t()) + b, atol=1e-5, rtol=1e-5)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(conv.weight.detach(), w_in_out, atol=1e-6, rtol=0)


def test_dropout_only_touches_the_adapter_input() -> None:
    torch.manual_seed(9)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, r=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the dropped adapter adds nothing
    randomise_adapters(layer, seed=10)
    assert not torch.allclose(layer(x), layer(x))  # a new mask each call ...
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))  # ... and none in evaluation


# --- merging: no inference latency (§4.1) ----------------------------------------------------------------

def test_merged_model_computes_the_same_function_and_unmerge_restores_w0() -> None:
    model = lora_gpt(seed=11)
    originals = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".weight")}
    optimizer = torch.optim.AdamW(weight_decay_groups(model), lr=1e-2)
    model.train()
    for step in range(5):  # a few real training steps, so that A and B are what training makes them
        x = tokens(100 + step)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(layer.lora_B.abs().max() > 0 for layer in lora_layers(model))
    x = tokens(12)
    with torch.no_grad():
        unmerged = model(x)
        assert merge_lora(model) == 4
        assert all(layer.merged for layer in lora_layers(model))
        qkv = "base.layers.0.attention.qkv_proj.weight"
        assert not torch.allclose(model.get_parameter(qkv), originals[qkv])  # ΔW is inside W₀ now
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-6, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        if name.endswith(".weight"):
            torch.testing.assert_close(p.detach(), originals[name], atol=1e-6, rtol=0)


class Int8Linear(nn.Module):
    """A stand-in for a quantised linear layer: int8 weights and a per-row scale, no float weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight_int8", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_int8.float() * self.scale, self.bias)


def test_lora_over_a_frozen_quantised_base_trains_but_refuses_to_merge() -> None:
    torch.manual_seed(13)
    quantised = Int8Linear(nn.Linear(32, 8))
    layer = LoRALinear(quantised, r=2, alpha=4.0)
    x = torch.randn(6, 32)
    torch.testing.assert_close(layer(x), quantised(x))
    randomise_adapters(layer, seed=14)
    w = quantised.weight_int8.float() * quantised.scale
    dense = w + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer(x), F.linear(x, dense, quantised.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(PapertrainError, match="floating-point weight"):
        layer.merge()
    assert not layer.merged


class DoubledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as bitsandbytes' Linear8bitLt has): LoRA must call it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_linear_subclass_keeps_its_own_forward() -> None:
    torch.manual_seed(23)
    base = DoubledLinear(8, 8)
    layer = LoRALinear(base, r=2, alpha=2.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base(x))


def test_fp32_adapters_over_a_bfloat16_base() -> None:
    torch.manual_seed(24)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=4.0)
    randomise_adapters(layer, seed=25)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(5, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    dense = base.weight.float() + 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(y.float(), F.linear(x.float(), dense, base.bias.float()), atol=0.05, rtol=0.02)


# --- what trains --------------------------------------------------------------------------------------

def test_only_the_adapters_train_and_the_base_never_changes() -> None:
    model = lora_gpt(seed=15).train()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert model.report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(weight_decay_groups(model), lr=1e-2, weight_decay=0.1)
    x = tokens(16)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, adapters[name]), name


def test_train_biases_also_trains_every_bias() -> None:
    model = LoRAModel(small_gpt(seed=17), r=2, alpha=2, targets=TARGETS, train_biases=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith("ffn.linear1.bias") for name in trainable)
    assert all(name.endswith(("lora_A", "lora_B", "bias")) for name in trainable)
    assert set(lora_state_dict(model)) == trainable


def test_parameter_names_stay_those_of_the_base() -> None:
    base_names = {f"base.{name}" for name in small_gpt().state_dict()}
    adapted = set(lora_gpt().state_dict())
    assert base_names <= adapted
    assert {name for name in adapted - base_names} == {f"base.layers.{i}.attention.{p}.lora_{m}"
                                                       for i in range(2) for p in ("qkv_proj", "out_proj")
                                                       for m in "AB"}


def test_the_tiny_config_trains_under_one_percent_of_the_parameters() -> None:
    config = load_config(CONFIG)
    model = instantiate(config.run.model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # |Θ| = Σ over the adapted d×k matrices of r·(d + k): W_qkv [3d, d] and W_o [d, d] in every layer
    base, r = config.run.model["base"], config.run.model["r"]
    d = base["d_model"]
    assert trainable == model.report.trainable == base["n_layers"] * (r * (d + 3 * d) + r * (d + d))
    assert trainable / total < 0.01


# --- adapters on disk -----------------------------------------------------------------------------------

def test_adapter_file_round_trips_and_holds_only_a_and_b(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = lora_gpt(seed=18)
    randomise_adapters(model, seed=19)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert names == set(lora_state_dict(model)) and len(names) == 8
    assert all(name.endswith(("lora_A", "lora_B")) for name in names)
    assert json.loads(metadata["r"]) == [4] and json.loads(metadata["alpha"]) == [8.0]
    assert json.loads(metadata["targets"]) == TARGETS
    full = sum(p.numel() for p in model.parameters()) * 4
    assert path.stat().st_size < 0.25 * full

    fresh = lora_gpt(seed=18)  # the same base, new adapters (B = 0)
    x = tokens(20)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x))
        load_adapter(fresh, path)
        assert torch.equal(fresh(x), model(x))


def test_an_adapter_that_does_not_fit_is_refused_with_the_differences(tmp_path: Path) -> None:
    path = save_adapter(lora_gpt(seed=21), tmp_path / "adapter.safetensors")
    with pytest.raises(PapertrainError, match=r"lora_A: file \(4, 32\) vs model \(8, 32\)"):
        load_adapter(lora_gpt(seed=21, r=8, alpha=16), path)
    with pytest.raises(PapertrainError, match="in the file but not in the model"):
        load_adapter(lora_gpt(seed=21, targets=["attention.qkv_proj"]), path)
    with pytest.raises(PapertrainError, match="α/r would differ"):
        load_adapter(lora_gpt(seed=21, alpha=32), path)


# --- choosing layers ------------------------------------------------------------------------------------

def test_a_target_that_matches_nothing_says_so_and_suggests_names() -> None:
    with pytest.raises(PapertrainError, match="'qkv_prj' matches no module.*qkv_proj"):
        apply_lora(small_gpt(), ["qkv_prj"], r=2, alpha=2)
    with pytest.raises(PapertrainError, match="matches no linear layer"):
        apply_lora(small_gpt(), ["layers.0.attention"], r=2, alpha=2)


def test_fnmatch_patterns_select_layers() -> None:
    report = apply_lora(small_gpt(), ["layers.1.*.linear*"], r=2, alpha=2)
    assert report.adapted == ["layers.1.ffn.linear1", "layers.1.ffn.linear2"]


def test_a_tied_weight_is_not_adapted() -> None:
    with pytest.raises(PapertrainError, match="tied weights"):
        apply_lora(small_gpt(), ["lm_head"], r=2, alpha=2)


# --- with the engine --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["papertrain", "hf"])
def test_base_weights_load_from_papertrain_export(tmp_path: Path, layout: str) -> None:
    """A GPT trained and exported by the engine is the frozen base LoRA starts from, in either layout."""
    from papertrain.export import export

    gpt = RECIPES / "transformers" / "gpt" / "tiny.yaml"
    small = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.block_size=16",
             "trainer.batch_size=4", "trainer.max_steps=3", "trainer.progress=none", "trainer.tensorboard=false",
             "trainer.plot=false", "trainer.eval_every=0", "trainer.sample_every=-1", "trainer.checkpoint_every=0"]
    config = load_config(gpt, small)
    trainer = Trainer(config, tmp_path / "gpt")
    trainer.run()
    trained = trainer.raw_model.eval()  # the weights as training left them
    folder, used = export(tmp_path / "gpt", layout=layout)
    assert used == layout

    adapted = LoRAModel(instantiate(config.tree["model"]), r=2, alpha=2, targets=TARGETS,
                        base_weights=str(folder / "model.safetensors")).eval()
    x = tokens(22, length=16, vocab=65)
    with torch.no_grad():
        assert torch.equal(adapted(x), trained(x))
    with pytest.raises(PapertrainError, match="does not fit the base model"):
        LoRAModel(GPT(vocab_size=65, block_size=16, n_layers=1, n_heads=2, d_model=48, norm_first=True),
                  r=2, alpha=2, targets=TARGETS, base_weights=str(folder / "model.safetensors"))


def test_the_engines_finetune_lora_section_applies_these_adapters() -> None:
    """`finetune: {train: lora, lora: {...}}` over any recipe's model goes through apply_lora, and its
    settings are checked like every other section (an unknown key is named, with the valid ones)."""
    from conftest import gpt_config_path
    from papertrain.config import ConfigError
    from papertrain.modelbuild import model_builder

    config = load_config(gpt_config_path(), ["model.n_layers=2", "finetune=lora", "finetune.lora.r=2",
                                             "finetune.lora.alpha=4", f"finetune.lora.targets={TARGETS}"])
    model = model_builder(config, torch.device("cpu"), "single", "fp32")()
    assert len(lora_layers(model)) == 4
    assert all(name.endswith(("lora_A", "lora_B")) for name, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="finetune.lora.rank: unknown key; valid keys: alpha, dropout, r, targets"):
        load_config(gpt_config_path(), ["finetune=lora", "finetune.lora.rank=2", f"finetune.lora.targets={TARGETS}"])


def test_lora_gpt_learns_shakespeare_in_seconds(tmp_path: Path) -> None:
    config = load_config(CONFIG, [*SMALL_LORA, "trainer.max_steps=150"])
    untrained, trained = learns(config, tmp_path / "run")
    assert untrained > 0.97 * math.log(65)  # about uniform over 65 characters
    assert trained < 3.6


@pytest.mark.slow
def test_the_tiny_config_reaches_its_goal(tmp_path: Path) -> None:
    """`papertrain run lora` exactly as shipped meets meta.yaml's goal."""
    import yaml

    goal = yaml.safe_load((RECIPES / "finetune/lora/meta.yaml").read_text())["goal"]
    assert run_shipped("lora", tmp_path / "lora")["val/loss"] <= goal["at_most"]
