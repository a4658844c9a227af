"""
# LLM.int8(): 8-bit matrix multiplication for transformers at scale (Dettmers, Lewis, Belkada & Zettlemoyer, 2022)

The linear layers hold nearly all of a transformer's weights. Storing them as int8 halves the memory of
fp16 weights (a quarter of fp32), and int8 matrix units multiply them fast. The obstacle the paper
found is not int8 itself but *emergent outlier features*: from about 6.7B parameters on, a handful of
hidden feature dimensions carry activations far larger than all the others, in most layers and most
tokens (§4). Quantising such a matrix naively spends the whole int8 grid on the outliers and rounds
everything else to a few levels; zero-shot accuracy collapses. LLM.int8() is two ideas.

**Absmax quantisation** (§2.1) scales a tensor into [-127, 127] by its largest magnitude and rounds:

    X_i8 = ⌊ 127 · X / max|X| ⌉                 (⌊·⌉: round to nearest)

so every element is off by at most max|X| / 127 / 2: one large value costs every other element precision.

**Vector-wise quantisation** (§3.1). A matrix product C = X W (X: [s, h], s tokens of h features;
W: [h, o]) is s·o independent inner products, each of one row of X with one column of W. Give each its
own constants, the absmax of every row of X and of every column of W,

    c_x = max_j |X_ij|  (one per token, [s]),       c_w = max_j |W_jk|  (one per output, [o])

multiply the int8 matrices with exact int32 accumulation, and undo both scales with their outer product:

    C ≈ (c_x ⊗ c_w) / 127² · (X_i8 W_i8)        X_i8 = ⌊127 X / c_x⌉ row-wise,  W_i8 = ⌊127 W / c_w⌉ column-wise

An outlier now only coarsens its own row. But the emergent features sit in nearly every token, so
nearly every row of X still has one.

**Mixed-precision decomposition** (§3.2). The outliers live in a few *feature dimensions*, columns of X,
i.e. rows of W. Split the inner dimension h into the outlier set O and the rest,

    O = { j : |X_ij| ≥ α for some token i },       α = 6.0

    C ≈ Σ_{j ∈ O} X_{:j} W_{j:}    +    (c_x ⊗ c_w) / 127² · Σ_{j ∉ O} X_i8[:, j] W_i8[j, :]
        (16-bit: few columns, exact)       (int8: > 99.9 % of the values; c_x taken over j ∉ O only)

and sum the two results. Because O has a handful of members out of thousands, memory and compute stay
those of int8 while the values that matter most are never rounded.

**Layout here.** torch stores a linear layer's weight as [out, in] = Wᵀ, so the paper's column-wise c_w
is a per-*row* absmax of `weight`, and the outlier dimensions O index its *columns* (input features).
As in bitsandbytes (`has_fp16_weights=False`), only the int8 weight and its scales are kept; the 16-bit
W_O that the outlier product needs is recovered by dequantising those int8 columns, W_i8[:, O] · c_w / 127.
Weights have no emergent outliers, so this costs int8 *weight* precision there, not activation precision.

**Training through an int8 base.** Adapters or biases fine-tuned on top of a frozen int8 model need the
gradient with respect to the layer's input, ∂L/∂X = ∂L/∂C · Wᵀ (in torch's layout: grad_y @ weight).
The backward pass uses the dequantised weight and passes straight through the rounding of X (rounding
has zero derivative almost everywhere), as bitsandbytes does; the int8 weight itself gets no gradient.

`Int8Linear` is one such layer; `quantize_linears` converts a model in place, with this recipe's layer
or with bitsandbytes' `Linear8bitLt`, and reports the bytes before and after.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Literal

import torch
from torch import nn

from papertrain.errors import PapertrainError, did_you_mean

THRESHOLD = 6.0  # §3.2: α, the magnitude from which a feature dimension is an outlier ("α = 6.0 is sufficient")
INT8_MAX = 127  # §2.1: symmetric absmax range [-127, 127]; -128 is never produced
# The longest inner product that float32 sums exactly: |a·b| <= 127·127 = 16129 for every product, so any
# partial sum of n products is an integer of magnitude <= 16129·n, and float32 holds every integer up to
# 2^24 = 16,777,216 exactly. With n <= 2^24 // 16129 = 1040 no partial sum, in any summation order, rounds.
FP32_EXACT_TERMS = 2**24 // (INT8_MAX * INT8_MAX)  # 1040
Backend = Literal["own", "bitsandbytes"]
BACKENDS = ("own", "bitsandbytes")


# --- §2.1 / §3.1: absmax quantisation, one scale per row -----------------------------------------------

def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise absmax quantisation of a [N, K] matrix, one constant per row: (x_i8 [N, K], c [N]).

        c_i = max_j |x_ij|,        x_i8[i, j] = ⌊127 · x_ij / c_i⌉

    For X (tokens x features) a row is a token, c = c_x; for a weight [out, in] a row is an output
    feature, c = c_w. Each element is recovered to within c_i / 127 / 2 by `dequantize_rows`.
    """
    x = x.float()
    absmax = x.abs().amax(dim=-1)  # [N]
    # an all-zero row has c = 0: any scale gives x_i8 = 0, so divide by 1 instead of 0
    scale = INT8_MAX / torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # 127 / c_i
    x_i8 = (x * scale[:, None]).round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # [N, K]
    return x_i8, absmax


def dequantize_rows(x_i8: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """x ≈ x_i8 · c / 127 for each row: [N, K] int8, [N] -> [N, K] float32."""
    return x_i8.float() * (absmax[:, None] / INT8_MAX)


def _no_autocast(device: torch.device):
    """Autocast would run the float matmuls below in bf16/fp16 and round their outputs: switch it off."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact integer product a @ bᵀ of int8 matrices, as int32: a [N, K], b [M, K] -> [N, M].

    Int8 hardware multiplies int8 pairs and accumulates in int32 (`torch._int_mm`). On a CPU without
    AVX-512 VNNI that kernel is a scalar loop, ~50x slower than a float32 matmul here, so we compute the
    same integers with float32 matmuls: each block of at most FP32_EXACT_TERMS = 1040 inner terms is exact
    in float32 (see the constant), and the blocks are accumulated in int32, like the hardware. int32 holds
    the result for K up to 2^31 / 16129 ≈ 133,000 terms, far beyond any hidden size here.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 inputs, got {a.dtype} and {b.dtype}")
    with _no_autocast(a.device):
        out: torch.Tensor | None = None
        for start in range(0, a.shape[1], FP32_EXACT_TERMS):
            stop = start + FP32_EXACT_TERMS
            block = (a[:, start:stop].float() @ b[:, start:stop].float().T).to(torch.int32)  # exact integers
            out = block if out is None else out.add_(block)  # int32 accumulation across blocks
    if out is None:  # K = 0: the empty sum
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return out


# --- §3.2: mixed-precision decomposition ----------------------------------------------------------------

def outlier_dims(x: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """O as a mask over the feature dimensions: True where some token has |x| >= α. x: [..., K] -> [K]."""
    return (x.detach().abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0)


def int8_mixed_matmul(x: torch.Tensor, weight_i8: torch.Tensor, weight_absmax: torch.Tensor,
                      threshold: float = THRESHOLD) -> torch.Tensor:
    """LLM.int8()'s X Wᵀ without bias: x [..., in], weight_i8 [out, in], weight_absmax c_w [out] -> [..., out].

    Returns float32; `threshold=math.inf` turns the decomposition off (every column goes through int8).
    """
    in_features = x.shape[-1]
    with _no_autocast(x.device):
        x2d = x.reshape(-1, in_features).float()  # [N, in], N = all tokens of the batch
        outliers = outlier_dims(x2d, threshold)  # [in] bool: the set O
        # the int8 part: X with the outlier columns removed, quantised per token (c_x over j ∉ O)
        x_i8, x_absmax = quantize_rows(x2d.masked_fill(outliers, 0.0))  # [N, in] int8, c_x [N]
        c_i32 = int8_matmul(x_i8, weight_i8)  # [N, out]: Σ_{j∉O} X_i8 W_i8, exact
        y = c_i32.float() * (x_absmax[:, None] * weight_absmax[None, :] / INT8_MAX**2)  # ·(c_x ⊗ c_w)/127²
        if outliers.any():
            cols = outliers.nonzero().squeeze(1)  # [|O|]
            # the 16-bit part Σ_{j∈O} X_{:j} W_{j:}, with W_O dequantised from the stored int8 columns
            w_outliers = dequantize_rows(weight_i8[:, cols], weight_absmax)  # [out, |O|]
            y = y + x2d[:, cols] @ w_outliers.T  # [N, out]
    return y.reshape(*x.shape[:-1], weight_i8.shape[0])


class Int8MatMul(torch.autograd.Function):
    """Forward: `int8_mixed_matmul`. Backward: ∂L/∂X = ∂L/∂Y · W with the dequantised W (straight
    through the rounding of X); nothing for the int8 weight or its scales, which are frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_i8: torch.Tensor, weight_absmax: torch.Tensor,
                threshold: float) -> torch.Tensor:
        ctx.save_for_backward(weight_i8, weight_absmax)
        ctx.input_dtype = x.dtype
        return int8_mixed_matmul(x, weight_i8, weight_absmax, threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        weight_i8, weight_absmax = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            with _no_autocast(grad_y.device):
                w = dequantize_rows(weight_i8, weight_absmax)  # [out, in]
                grad_x = (grad_y.float() @ w).to(ctx.input_dtype)  # [..., out] @ [out, in] -> [..., in]
        return grad_x, None, None, None


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored in int8 with one float32 absmax per output row.

    Buffers (saved in the state dict, never trained): `weight` int8 [out, in] = W_i8ᵀ and
    `weight_absmax` float32 [out] = c_w. `bias` stays an nn.Parameter in its original dtype, so a
    biases-only fine-tune (or a LoRA adapter upstream) can train through the frozen int8 weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = THRESHOLD,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0 (the outlier magnitude α), got {threshold}; "
                             "use math.inf to turn the decomposition off (bitsandbytes spells that 0.0)")
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_absmax", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, threshold: float = THRESHOLD) -> Int8Linear:
        """Quantise a trained nn.Linear: W_i8 = ⌊127 W / c_w⌉ per output row; the bias is copied as is."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
                    device=weight.device, bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        weight_i8, weight_absmax = quantize_rows(weight.detach())  # [out, in] int8, c_w [out]
        layer.weight.copy_(weight_i8)
        layer.weight_absmax.copy_(weight_absmax)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
            layer.bias.requires_grad_(linear.bias.requires_grad)
        layer.train(linear.training)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ W_i8 · c_w / 127 as float32 [out, in] (what the backward pass multiplies by)."""
        return dequantize_rows(self.weight, self.weight_absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        y = Int8MatMul.apply(x, self.weight, self.weight_absmax, self.threshold)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold:g}")


# --- Converting a whole model ----------------------------------------------------------------------------

@dataclass
class QuantizationReport:
    """What `quantize_linears` converted, and the bytes of those layers measured from their tensors."""

    backend: str
    threshold: float
    converted: list[str] = field(default_factory=list)  # qualified names of the replaced nn.Linear layers
    skipped: list[str] = field(default_factory=list)
    parameters: int = 0  # weights and biases of the converted layers
    bytes_before: int = 0  # their weight + bias tensors before
    bytes_after: int = 0  # int8 weight + absmax scales + bias after

    @property
    def bytes_per_parameter_before(self) -> float:
        return self.bytes_before / max(self.parameters, 1)

    @property
    def bytes_per_parameter_after(self) -> float:
        return self.bytes_after / max(self.parameters, 1)

    def describe(self) -> str:
        return (f"{self.backend}: {len(self.converted)} linear layers, {self.parameters:,} parameters, "
                f"{self.bytes_before:,} -> {self.bytes_after:,} bytes "
                f"({self.bytes_per_parameter_before:.3f} -> {self.bytes_per_parameter_after:.3f} bytes/parameter)"
                + (f"; kept: {', '.join(self.skipped)}" if self.skipped else ""))


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast from float32 to float16" on *every* forward of a float32
    input: on CPU that is simply how it quantises activations (through fp16), nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _import_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PapertrainError("backend='bitsandbytes' needs the bitsandbytes package, which is not installed",
                              "pip install 'papertrain[int8]'") from None
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in notices.filters):
        notices.addFilter(_DropCastNotice())
    return bnb


def _bitsandbytes_linear(bnb, linear: nn.Linear, threshold: float) -> nn.Module:
    """bnb.nn.Linear8bitLt holding `linear`'s weight in int8 (bitsandbytes 0.50.2 behaviour, checked on CPU).

    `Int8Params(..., has_fp16_weights=False).to(device)` quantises when the data is on the CPU: the weight
    goes through float16, then row-wise absmax to int8 (`.data` and `.CB` become the same int8 [out, in]
    tensor, `.SCB` the float32 absmax [out]). A weight already on a GPU would not be quantised by `.to`, so
    it is moved to the CPU first. bitsandbytes' threshold 0.0 means "no decomposition" (ours: math.inf).
    """
    device = linear.weight.device
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0 if math.isinf(threshold) else threshold,
                                device="meta")  # meta: no throw-away float weight is allocated
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False,
                                     has_fp16_weights=False).to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    # In training mode bitsandbytes on CPU takes another path (MatMul8bitFp: dequantise W, float matmul, no
    # activation quantisation at all), so the new layer must be in the same mode as the one it replaces.
    layer.train(linear.training)
    return layer


def _layer_bytes(layer: nn.Module) -> int:
    """Bytes of the tensors a (converted or not) linear layer holds: weight, its scales, bias."""
    tensors = [layer.weight]  # float [out, in] before; int8 [out, in] after (for bitsandbytes `.data` is `.CB`)
    if isinstance(layer, Int8Linear):
        tensors.append(layer.weight_absmax)
    elif layer.weight.dtype == torch.int8:  # bitsandbytes: SCB sits on the weight until the first forward
        scb = getattr(layer.weight, "SCB", None)
        tensors.append(scb if scb is not None else layer.state.SCB)
    if layer.bias is not None:
        tensors.append(layer.bias)
    return sum(t.nbytes for t in tensors)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """`lm_head` matches `lm_head` and `decoder.lm_head`; shell patterns (`layers.0.*`) are allowed too."""
    return any(name == p or name.endswith("." + p) or fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def quantize_linears(model: nn.Module, backend: Backend = "own", threshold: float = THRESHOLD,
                     skip: Iterable[str] = ("lm_head",)) -> QuantizationReport:
    """Replace every float nn.Linear of `model` in place by an int8 layer and report the bytes saved.

    `backend="own"` uses `Int8Linear`, `"bitsandbytes"` uses `bnb.nn.Linear8bitLt(has_fp16_weights=False)`.
    Layers whose qualified name matches an entry of `skip` stay as they are (by default the output head:
    in GPT it shares its weight with the token embedding, which is not a linear layer). The out_proj of
    torch's nn.MultiheadAttention is also kept, because that module reads `out_proj.weight` directly.
    """
    if backend not in BACKENDS:
        close = did_you_mean(str(backend), BACKENDS)
        raise PapertrainError(f"unknown int8 backend '{backend}'",
                              (f"did you mean '{close}'? " if close else "")
                              + "use 'own' (this recipe's Int8Linear) or 'bitsandbytes'")
    if not threshold > 0:
        raise PapertrainError(f"threshold must be > 0, got {threshold}",
                              "6.0 is the paper's α; use inf to turn the mixed-precision decomposition off")
    bnb = _import_bitsandbytes() if backend == "bitsandbytes" else None
    skip = tuple(skip)
    report = QuantizationReport(backend=backend, threshold=threshold)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            # float weights only: a bitsandbytes layer is an nn.Linear too, but already holds int8
            if not isinstance(child, nn.Linear) or not child.weight.dtype.is_floating_point:
                continue
            if _matches(name, skip) or isinstance(parent, nn.MultiheadAttention):
                report.skipped.append(name)
                continue
            report.parameters += child.weight.numel() + (child.bias.numel() if child.bias is not None else 0)
            report.bytes_before += _layer_bytes(child)
            if backend == "own":
                replacement = Int8Linear.from_linear(child, threshold)
            else:
                replacement = _bitsandbytes_linear(bnb, child, threshold)
            setattr(parent, child_name, replacement)
            report.bytes_after += _layer_bytes(replacement)
            report.converted.append(name)
    return report
