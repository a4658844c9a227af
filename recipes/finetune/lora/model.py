"""
# LoRA: low-rank adaptation of large language models (Hu et al., 2021, arXiv:2106.09685)

Fine-tuning all weights of a large pretrained model gives a full-size copy per task. LoRA starts from a
hypothesis (§4.1): the *change* a weight matrix needs during adaptation has a low "intrinsic rank". So
freeze the pretrained W₀ ∈ ℝ^{d×k} and learn only a rank-r factorisation of its update:

    h = W₀ x + ΔW x = W₀ x + B A x,        B ∈ ℝ^{d×r},  A ∈ ℝ^{r×k},  r ≪ min(d, k)          (eq. 3)

A starts random (Gaussian in the paper; kaiming-uniform in the authors' `loralib`, which we follow),
B starts at zero, so ΔW = B A = 0 and training begins exactly at the pretrained model. ΔW x is scaled by
α/r: with Adam, α acts like a learning rate for the update, and fixing α while varying r keeps that
rate the same, so r can change without retuning (§4.1: "we simply set α to the first r we try").

Only A and B are trained: per adapted d×k matrix r·(d + k) numbers instead of d·k, and optimizer
state and gradients only for those. The paper adapts the attention projections and freezes the MLPs,
LayerNorms and biases (§4.2); on GPT-3 175B with r = 4 on W_q and W_v the checkpoint shrinks from
350 GB to 35 MB and training memory from 1.2 TB to 350 GB.

No inference latency (§4.1): W = W₀ + (α/r) B A is a matrix of W₀'s shape, so for deployment it can be
computed once and stored in place of W₀ (`merge`); subtracting it again recovers W₀ (`unmerge`), and
another task's B'A' can be added instead.

Here: `LoRALinear` wraps one frozen linear layer (nn.Linear, GPT-2's transposed `Conv1D`, or any
module that maps in_features -> out_features, such as a quantised linear); `apply_lora` swaps the
layers a list of name patterns selects and freezes everything else; `save_adapter` / `load_adapter`
store only A and B; `LoRAModel` does all of that from a config, over any base model component.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Range
from papertrain.errors import PapertrainError

KAIMING_A = math.sqrt(5)  # A's init as in loralib (and nn.Linear): uniform(±1/√k) for k inputs
ADAPTER_NAMES = ("lora_A", "lora_B")


def _float_layout(layer: nn.Module) -> str | None:
    """How a plain float layer computes W₀ x + b, where we can write it down ourselves:

    "linear"      nn.Linear: W₀ is [out, in], y = x W₀ᵀ + b
    "transposed"  GPT-2's Conv1D (transformers.pytorch_utils): W₀ is [in, out] = [nx, nf], y = x W₀ + b
    None          anything else (an int8 layer, a subclass with a forward of its own): called as it is
    """
    weight = getattr(layer, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.is_floating_point()):
        return None
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        return "linear"
    in_out = (getattr(layer, "nx", None), getattr(layer, "nf", None))
    if type(layer).__name__ == "Conv1D" and tuple(weight.shape) == in_out:
        return "transposed"
    return None


class LoRALinear(nn.Module):
    """h = W₀ x + b + (α/r) B A dropout(x), W₀ and b frozen (eq. 3).

    For nn.Linear and Conv1D the layer takes over the base's `weight` and `bias` parameters under the
    same names (so `...qkv_proj.weight` stays `...qkv_proj.weight`) and computes W₀ x + b itself; any
    other base (e.g. an int8 linear) is kept whole as `base_layer` and called, and cannot be merged.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise PapertrainError(f"LoRA rank r must be at least 1, got {r}")
        layout = _float_layout(base)
        self.transposed = layout == "transposed"
        if self.transposed:
            self.in_features, self.out_features = base.nx, base.nf
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise PapertrainError(f"LoRA needs a linear layer; a {type(base).__name__} has no in_features/out_features",
                                  "target nn.Linear, Conv1D, or layers that say their in_features and out_features")
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r  # §4.1: ΔW x is scaled by α/r
        if layout is not None:
            self.weight = base.weight  # W₀: [out, in] (nn.Linear) or [in, out] (Conv1D), the same Parameter
            self.bias = base.bias
            self.base_layer = None
        else:
            self.weight = self.bias = None
            self.base_layer = base  # anything that computes W₀ x + b; not merged into
        device = next(itertools.chain(base.parameters(), base.buffers()), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # A: [r, k]
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device))  # B: [d, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A random, B = 0: ΔW = B A = 0, so the adapted model starts as the pretrained one (§4.1)."""
        with torch.no_grad():
            drawn = torch.empty(self.lora_A.shape)  # drawn on the CPU: the same numbers on any device
            nn.init.kaiming_uniform_(drawn, a=KAIMING_A, generator=generator)
            self.lora_A.copy_(drawn)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) B A: [out, in], the layout of nn.Linear's weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W₀ x + b, the frozen pretrained layer (with ΔW folded into W₀ once merged)."""
        if self.base_layer is not None:
            return self.base_layer(x)
        weight = self.weight.t() if self.transposed else self.weight  # [out, in]
        return F.linear(x, weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        h = self.base_forward(x)  # W₀ x + b
        if self.merged:
            return h  # ΔW already inside W₀
        # B (A x): two thin products, r·(in + out) per token, never the [out, in] matrix ΔW. A and B stay
        # in fp32 over a 16-bit or int8 base; the update joins h in h's dtype.
        x = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # [..., r] -> [..., out]
        return h + (self.scaling * update).to(h.dtype)

    def _mergeable_weight(self, action: str) -> torch.Tensor:
        if self.weight is None or not self.weight.is_floating_point():
            kind = type(self.base_layer).__name__ if self.base_layer is not None else type(self).__name__
            raise PapertrainError(f"cannot {action} LoRA over a {kind} base: merging needs a floating-point "
                                  "weight W₀ to add (α/r)·B·A to, and this base layer has none",
                                  "keep the adapter unmerged (its forward computes base(x) + (α/r)·B·A·x)")
        return self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W₀ <- W₀ + (α/r) B A: the layer becomes a plain linear layer again, without extra latency (§4.1)."""
        if self.merged:
            return
        weight = self._mergeable_weight("merge")
        delta = self.delta_weight().to(weight.dtype)
        weight += delta.t() if self.transposed else delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ <- W₀ - (α/r) B A: back to the pretrained weight (to train on, or to swap in another task)."""
        if not self.merged:
            return
        weight = self._mergeable_weight("unmerge")
        delta = self.delta_weight().to(weight.dtype)
        weight -= delta.t() if self.transposed else delta
        self.merged = False

    def extra_repr(self) -> str:
        layout = ", transposed (Conv1D)" if self.transposed else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}{layout}, merged={self.merged}")


# --- choosing, swapping and freezing layers ------------------------------------------------------------

@dataclass
class LoRAReport:
    """What `apply_lora` did: the layers it adapted and how many parameters remain trainable."""

    adapted: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"LoRA on {len(self.adapted)} layers: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.fraction:.3f}%)")


def _matches(name: str, pattern: str) -> bool:
    """A target is a name suffix (`qkv_proj` matches `layers.0.attention.qkv_proj`) or an fnmatch pattern."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _is_linear_like(module: nn.Module) -> bool:
    return _float_layout(module) is not None or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def _close_names(pattern: str, names: list[str]) -> list[str]:
    """Module names, and their last components, that look like a mistyped target."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return difflib.get_close_matches(pattern, leaves + names, n=5, cutoff=0.5)


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0,
               train_biases: bool = False) -> LoRAReport:
    """Freeze every parameter of `model`, then replace each linear layer a target matches by a LoRALinear.

    `targets` are name suffixes or fnmatch patterns of module names (`qkv_proj`, `layers.*.attention.*`).
    With `train_biases`, every bias of the model trains as well (the paper freezes them, §4.2).
    """
    if isinstance(targets, str):
        targets = [targets]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise PapertrainError("this model already has LoRA layers", "apply LoRA once, to the pretrained model")
    for p in model.parameters():
        p.requires_grad_(False)  # W₀ and everything else stay as pretrained

    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    owners: dict[int, list[str]] = {}  # parameter identity -> every name it has (tied weights have several)
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)

    chosen: list[str] = []
    for pattern in targets:
        matched = [n for n in names if _matches(n, pattern)]
        if not matched:
            close = _close_names(pattern, names)
            raise PapertrainError(f"LoRA target '{pattern}' matches no module of {type(model).__name__}"
                                  + (f"; close names: {', '.join(close)}" if close else ""),
                                  "targets are module-name suffixes or fnmatch patterns, e.g. 'qkv_proj' or "
                                  "'layers.*.attention.out_proj'; print(model) shows the names")
        linear = [n for n in matched if _is_linear_like(modules[n])]
        if not linear:
            found = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in matched[:5])
            raise PapertrainError(f"LoRA target '{pattern}' matches no linear layer, only: {found}",
                                  "name the linear layers inside, e.g. '<module>.qkv_proj'")
        chosen += [n for n in linear if n not in chosen]

    for name in chosen:
        layer = modules[name]
        weight = getattr(layer, "weight", None)
        if isinstance(weight, nn.Parameter) and len(owners.get(id(weight), [])) > 1:
            raise PapertrainError(f"'{name}' shares its weight with {', '.join(owners[id(weight)])} (tied weights): "
                                  "merging ΔW into it would change the other layer too",
                                  "adapt layers with weights of their own (e.g. the attention projections)")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = LoRALinear(layer, r, alpha, dropout)
        # A's numbers depend only on the run's seed and this layer's name, not on which other layers
        # exist: each stage of a pipeline (holding some of the layers) draws what one process would
        adapter.reset_parameters(torch.Generator().manual_seed((torch.initial_seed() + zlib.crc32(name.encode()))
                                                               % 2**63))
        setattr(parent, child, adapter)  # in place: the name stays the same

    if train_biases:
        for name, p in model.named_parameters():
            if _is_bias(name):
                p.requires_grad_(True)
    model.lora_targets = list(targets)  # recorded in saved adapters
    trainable, total = trainable_count(model)
    return LoRAReport(adapted=chosen, trainable=trainable, total=total)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (for inference); returns the number of layers merged."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Take every adapter out of its base weight again; returns the number of layers."""
    layers = lora_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


# --- adapters on disk: A and B only ------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every A and B, plus biases if they were trained (`train_biases`)."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] in ADAPTER_NAMES or (p.requires_grad and _is_bias(name))}


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    layers = lora_layers(model)
    if not layers:
        raise PapertrainError(f"{type(model).__name__} has no LoRA layers", "call apply_lora(model, ...) first")
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {"format": "pt", "method": "lora",
            "r": json.dumps(sorted({m.r for m in layers})), "alpha": json.dumps(sorted({m.alpha for m in layers})),
            "targets": json.dumps(getattr(model, "lora_targets", [])), "layers": json.dumps(names)}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """One safetensors file with A and B of every adapted layer (and trained biases), and r, α, targets."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in lora_state_dict(model).items()}
    save_file(tensors, str(path), metadata=adapter_metadata(model))
    return path


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load A and B (and trained biases) saved by `save_adapter` into a model with the same LoRA layers.

    Refuses, listing every difference, a file whose tensor names, shapes or α/r do not fit. Returns the
    file's metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if any(m.merged for m in lora_layers(model)):
        raise PapertrainError("cannot load an adapter into merged LoRA layers (W₀ holds the old ΔW)",
                              "call unmerge_lora(model) first")
    expected = lora_state_dict(model)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    problems = [f"{name}: file {tuple(stored[name].shape)} vs model {tuple(expected[name].shape)}"
                for name in stored if name in expected and stored[name].shape != expected[name].shape]
    problems += [f"{name}: in the file but not in the model" for name in stored if name not in expected]
    problems += [f"{name}: in the model but not in the file" for name in expected if name not in stored]
    ours = adapter_metadata(model)
    if "alpha" in metadata and "r" in metadata and (metadata["alpha"], metadata["r"]) != (ours["alpha"], ours["r"]):
        problems.append(f"scaling: file has r={metadata['r']}, alpha={metadata['alpha']}, model has "
                        f"r={ours['r']}, alpha={ours['alpha']} (α/r would differ)")
    if problems:
        listed = "\n    ".join(problems[:8]) + (f"\n    ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PapertrainError(f"{path} does not fit this model's LoRA layers:\n    {listed}",
                              "apply_lora with the targets, r and alpha the adapter was trained with "
                              f"(file: targets={metadata.get('targets', '?')}, r={metadata.get('r', '?')}, "
                              f"alpha={metadata.get('alpha', '?')})")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in stored.items():
            parameters[name].copy_(tensor)
    return metadata


# --- the base model's pretrained weights ---------------------------------------------------------------

def load_base_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file written by `papertrain export` into the (not yet adapted) base model.

    Both of export's layouts work: our own key names (`--layout papertrain`, tied weights stored once)
    and, for a base whose recipe has an `hf` module (GPT), Hugging Face's names (the default there).
    """
    import importlib

    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise PapertrainError(f"base weights not found: {path}",
                              "train and export the base first (papertrain run gpt; papertrain export runs/gpt), "
                              "or set model.base_weights=null for a randomly initialised base")
    state = load_file(str(path))
    expected = model.state_dict()
    if not set(state) & set(expected):  # not our names: perhaps Hugging Face's, if the base has a mapping
        package = type(model).__module__.rsplit(".", 1)[0]
        try:
            hf = importlib.import_module(f"{package}.hf")
            state = hf.from_hf_state_dict(state, n_layers=model.n_layers, flavour=hf.flavour_of(model))
        except (ModuleNotFoundError, AttributeError, KeyError) as err:
            raise PapertrainError(f"{path} has none of {type(model).__name__}'s parameter names "
                                  f"(e.g. {next(iter(state), '?')}) and could not be read as a Hugging Face layout "
                                  f"({err})", "export the base with `papertrain export RUN --layout papertrain`")
    # a tied weight is stored once: its other names are satisfied by the tensor they share
    storage_names: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in expected.items():
        storage_names.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k}: in the file but not in the model" for k in state if k not in expected]
    problems += [f"{names[0]}: in the model but not in the file" for names in storage_names.values()
                 if not any(n in state for n in names)]
    if problems:
        listed = "\n    ".join(problems[:8]) + (f"\n    ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PapertrainError(f"{path} does not fit the base model this config builds:\n    {listed}",
                              "set model.base to the config the base was trained with")
    model.load_state_dict(state, strict=False)


# --- the config component ------------------------------------------------------------------------------

class LoRAModel(nn.Module):
    """A base model (any `_component_`, e.g. GPT), optionally loaded from `base_weights`, with LoRA applied.

    Parameter names are the base's with a `base.` prefix (`base.layers.0.attention.qkv_proj.weight`),
    the adapters beside them (`...qkv_proj.lora_A`); forward, `vocab_size` and `block_size` are the base's.
    """

    freezes_parameters = True  # the base is frozen (papertrain validate refuses strategy.meta_init for it)

    def __init__(self, base: nn.Module, r: PositiveInt, alpha: PositiveFloat, targets: list[str],
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0, base_weights: str | None = None,
                 train_biases: bool = False):
        super().__init__()
        on_meta = any(p.is_meta for p in base.parameters())  # shapes only (papertrain plan, export)
        if base_weights and not on_meta:
            load_base_weights(base, base_weights)
        self.base = base
        self.report = apply_lora(self, targets, r, alpha, dropout, train_biases)

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def block_size(self) -> int:
        return self.base.block_size

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)  # e.g. GPT: input_ids [B, T] -> logits [B, T, V]

    def merge(self) -> int:
        return merge_lora(self)

    def unmerge(self) -> int:
        return unmerge_lora(self)

    def save_adapter(self, path: str | Path) -> Path:
        return save_adapter(self, path)

    def load_adapter(self, path: str | Path) -> dict[str, str]:
        return load_adapter(self, path)
