"""
# Fuzzy Tiling Activations (Pan, Banman & White, ICLR 2021)

"Fuzzy Tiling Activations: A Simple Approach to Learning Sparse Representations Online" wants sparse
hidden representations, which interfere less when a network learns online from correlated data, but
without a sparsity penalty or a pre-training phase. Its tool is *binning*: an activation that turns
each scalar into a vector saying which interval it falls in.

**Tiling (§3.1).** Cut the range [l, u] into k = (u - l)/δ bins of width δ, starting at the tiling vector

    c = (l, l + δ, l + 2δ, ..., u - δ)                                      k entries

The distance from a scalar z to bin i, [c_i, c_i + δ], is max(c_i - z, 0) + max(z - δ - c_i, 0): zero
inside the bin, growing linearly outside it. The tiling activation marks the bins at distance 0,

    φ(z) = 1 - I_+(max(c - z, 0) + max(z - δ - c, 0)),      I_+(x) = 1 if x > 0, else 0

a one-hot vector (for z inside [l, u], away from the bin edges). It is maximally sparse, but its
derivative is zero almost everywhere: nothing before it could learn.

**Fuzzy tiling (§3.2).** Replace the hard indicator by a fuzzy one that rises linearly for small
distances,

    I_{η,+}(x) = I_+(η - x) x + I_+(x - η)             (= x for x < η, 1 for x > η)

    φ_η(z) = 1 - I_{η,+}(max(c - z, 0) + max(z - δ - c, 0))

A bin now answers 1 inside itself, 1 - d at a distance d < η outside it, and 0 further away. Within
η of a bin the output moves with z, so the gradient ∂φ_η/∂z = ±1 reaches the layers below; η = 0 is the
hard tiling again. Note the paper's indicator literally: at x = η *exactly*, both I_+ terms are 0, so
I_{η,+}(η) = 0 and the bin answers 1 (a measure-zero quirk that we reproduce), and for η < 1 the output
jumps from 1 - η to 0 at distance η (the fuzzy fringe does not fade to 0 continuously).

**Sparsity.** Bin i is nonzero iff its distance to z is at most η (below η by the fuzzy part, exactly η
by the quirk above), i.e. iff c_i ∈ [z - δ - η, z + η], a closed interval of length δ + 2η. The c_i are
spaced δ apart, so it holds at most ⌊(δ + 2η)/δ⌋ + 1 of them:

    ‖φ_η(z)‖₀ ≤ ⌊2η/δ⌋ + 2        for every z        (`max_nonzero`)

The bound is attained (by a z at distance exactly η from a bin, or on an edge when η = 0); an *open*
interval of the same length holds at most ⌈2η/δ⌉ + 1 points, which is therefore the bound for almost
every z. The two differ only when 2η/δ is a whole number: with η = δ, at most 3
nonzeros out of k for almost every z, 4 at worst. η = 0 gives 1 (2 exactly on a bin edge).

**Gradient.** ∂φ_η(z)_i/∂z = ±1 where 0 < distance_i < η and 0 elsewhere. A z inside its bin at offset t
from the left edge is within η of a neighbour's fringe iff min(t, δ - t) < η: a fraction min(1, 2η/δ)
of all inputs gets a gradient (every input once η ≥ δ/2), against none for the hard tiling. (For η > 1
the fringe 1 - d goes negative; keep η ≤ 1.)

**In a network.** FTA maps each of d units to k numbers, so the layer after it sees d·k inputs. Here it
replaces GELU in a Transformer's feed-forward block (after the first linear layer, as the paper uses
it after a hidden layer):

    FFN(x) = W₂ φ_η(x W₁ + b₁) + b₂,        W₁: d_model -> d_ff,   W₂: d_ff·k -> d_model

To compare with GELU at the same size, d_ff is chosen so that W₁ and W₂ together hold as many weights as
GELU's FFN: d_ff·(k + 1) ≈ 2·d_ff_gelu.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
from torch import nn

from papertrain.config.constraints import AnyFloat, NonNegativeFloat, PositiveFloat, PositiveInt, Range
from papertrain.errors import PapertrainError
from papertrain.recipes.transformers.blocks.model import Activation
from papertrain.recipes.transformers.gpt.model import GPT


def fuzzy_indicator(x: torch.Tensor, eta: float) -> torch.Tensor:
    """I_{η,+}(x) = I_+(η - x)·x + I_+(x - η), with I_+(a) = 1 for a > 0 else 0 (the paper's definition)."""
    return (eta - x > 0).to(x.dtype) * x + (x - eta > 0).to(x.dtype)


def tiling_vector(lower: float, delta: float, k: int, device=None, dtype=None) -> torch.Tensor:
    """c = (l, l + δ, ..., u - δ): the left edge of each of the k bins. [k]"""
    return lower + delta * torch.arange(k, device=device, dtype=dtype)


def fuzzy_tiling(z: torch.Tensor, lower: float, delta: float, eta: float, k: int) -> torch.Tensor:
    """φ_η(z) = 1 - I_{η,+}(max(c - z, 0) + max(z - δ - c, 0)), term by term: [..., d] -> [..., d, k].

    The definition as the paper writes it, differentiated by autograd. `FTA` computes the same numbers
    with fewer passes over the [..., d, k] tensor and its own derivative (`FuzzyTilingFunction`).
    """
    c = tiling_vector(lower, delta, k, device=z.device, dtype=z.dtype)  # [k]
    z = z.unsqueeze(-1)  # [..., d, 1] against c: [k]
    distance = torch.clamp(c - z, min=0) + torch.clamp(z - delta - c, min=0)  # to bin [c_i, c_i + δ]
    return 1 - fuzzy_indicator(distance, eta)


class FuzzyTilingFunction(torch.autograd.Function):
    """φ_η with a hand-written derivative: the activation is k times wider than its input, so every pass
    over [..., d, k] costs, and autograd's version keeps several such tensors alive for the backward pass.

    The distance to bin i is the distance to its centre m_i = c_i + δ/2 less half a width,
    dist_i = max(|z - m_i| - δ/2, 0), and φ_i = 1 - dist_i inside the fringe (dist_i < η), 1 at
    dist_i = η exactly (the paper's I_{η,+}(η) = 0), 0 beyond. Its derivative is

        ∂φ_i/∂z = -sign(z - m_i)   where 0 < dist_i < η,      0 elsewhere

    (flat inside the bin and beyond the fringe; we take 0 at the measure-zero kinks). The forward pass
    keeps only that derivative, as int8 in {-1, 0, 1}, for the backward pass: ∂L/∂z = Σ_i ∂L/∂φ_i ∂φ_i/∂z.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, lower: float, delta: float, eta: float, k: int) -> torch.Tensor:
        centres = tiling_vector(lower, delta, k, device=z.device, dtype=z.dtype) + delta / 2  # m_i: [k]
        offset = z.unsqueeze(-1) - centres  # z - m_i: [..., d, k]
        distance = offset.abs().sub_(delta / 2).clamp_(min=0)  # dist_i
        beyond = distance >= eta  # outside the fringe (and its edge): φ_i = 0, flat
        exactly_eta = distance == eta
        flat = beyond | (distance == 0)  # inside the bin, φ_i = 1, also flat
        slope = offset.sign_().to(torch.int8).masked_fill_(flat, 0).neg_()  # ∂φ_i/∂z = -sign(z - m_i)
        ctx.save_for_backward(slope)
        # φ_i = 1 - dist_i in the fringe, 0 beyond it, 1 at dist_i = η exactly: written over dist_i in place
        return distance.neg_().add_(1).masked_fill_(beyond, 0).masked_fill_(exactly_eta, 1)

    @staticmethod
    def backward(ctx, grad_phi: torch.Tensor):
        (slope,) = ctx.saved_tensors
        return (grad_phi * slope).sum(dim=-1), None, None, None, None


def bins(lower: float, upper: float, delta: float) -> int:
    """k = (u - l)/δ, which must be a whole number (the bins tile [l, u] exactly)."""
    if not (upper > lower and delta > 0):
        raise PapertrainError(f"FTA needs lower < upper and delta > 0, got lower={lower}, upper={upper}, "
                              f"delta={delta}", "use e.g. lower=-2, upper=2, delta=0.5 (k = 8 bins)")
    k = round((upper - lower) / delta)
    if abs(k * delta - (upper - lower)) > 1e-6 * max(1.0, abs(upper - lower)):
        raise PapertrainError(f"FTA bins of width delta={delta} do not tile [{lower}, {upper}] exactly "
                              f"((upper - lower)/delta = {(upper - lower) / delta:g})",
                              "choose delta so that (upper - lower)/delta is a whole number")
    return k


def max_nonzero(delta: float, eta: float) -> int:
    """The most nonzero outputs FTA can give one scalar: ⌊2η/δ⌋ + 2 (see the module docstring)."""
    return math.floor(2 * eta / delta + 1e-9) + 2


class FTA(nn.Module):
    """φ_η(z) for every unit of z: [..., d] -> [..., d·k], each unit's k bins side by side."""

    def __init__(self, lower: float = -2.0, upper: float = 2.0, delta: float = 0.5, eta: float = 0.5):
        super().__init__()
        if eta < 0:
            raise PapertrainError(f"FTA eta={eta} must be >= 0 (0 is the hard tiling)",
                                  "use eta=delta, so that every input gets a gradient")
        self.lower, self.upper, self.delta, self.eta = lower, upper, delta, eta
        self.k = bins(lower, upper, delta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        phi = FuzzyTilingFunction.apply(z, self.lower, self.delta, self.eta, self.k)  # [..., d, k]
        return phi.flatten(-2)  # [..., d·k]

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}, delta={self.delta}, eta={self.eta}, k={self.k}"


class FTAFeedForward(nn.Module):
    """FFN(x) = W₂ φ_η(x W₁ + b₁) + b₂: GPT's feed-forward block with FTA in place of GELU.

    The layers keep GPT's names (linear1, linear2), so GPT's initialisation treats them as its own (W₂
    writes into the residual stream and gets the 1/√(2n) scaled init under pre-norm).
    """

    def __init__(self, d_model: int, d_ff: int, lower: float = -2.0, upper: float = 2.0, delta: float = 0.5,
                 eta: float = 0.5):
        super().__init__()
        self.fta = FTA(lower, upper, delta, eta)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff * self.fta.k, d_model)  # the input grows k-fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.fta(self.linear1(x)))  # [B, T, d_model] -> [B, T, d_ff·k] -> [B, T, d_model]


def fta_gpt(vocab_size: PositiveInt, block_size: PositiveInt, n_layers: PositiveInt = 4, n_heads: PositiveInt = 4,
            d_model: PositiveInt = 128, d_ff: PositiveInt | None = None,
            dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0, norm_first: bool = True,
            activation: Literal["fta"] | Activation = "fta", lower: AnyFloat = -2.0, upper: AnyFloat = 2.0,
            delta: PositiveFloat = 0.5, eta: NonNegativeFloat = 0.5) -> GPT:
    """The GPT recipe's model with FTA feed-forward blocks (`activation: fta`), or GPT unchanged (gelu, relu).

    d_ff is the width before the activation; with FTA the second layer sees d_ff·k numbers. GPT's own
    initialisation runs again after the swap, so the weights depend only on the seed.
    """
    model = GPT(vocab_size, block_size, n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_ff=d_ff,
                dropout=dropout, norm_first=norm_first, activation="gelu" if activation == "fta" else activation)
    if activation == "fta":
        for layer in model.layers:
            layer.ffn = FTAFeedForward(d_model, d_ff or 4 * d_model, lower, upper, delta, eta)
        model.reset_parameters()
        model.display_name = f"GPT with FTA feed-forward (k={model.layers[0].ffn.fta.k} bins per unit)"
    return model


def _check_fta_gpt_arguments(arguments: dict) -> Iterator[tuple[str, str]]:
    """GPT's own cross check (n_heads divides d_model), and with FTA bins that tile [lower, upper] exactly."""
    yield from GPT.check_arguments(arguments)
    if arguments["activation"] == "fta":
        try:
            bins(arguments["lower"], arguments["upper"], arguments["delta"])
        except PapertrainError as err:
            yield ("upper" if arguments["upper"] <= arguments["lower"] else "delta"), f"{err.message}; {err.hint}"


fta_gpt.check_arguments = _check_fta_gpt_arguments  # fta_gpt is a function: the validator looks up this attribute
