"""
# Generative adversarial nets (Goodfellow et al., 2014)

A generator G maps noise z ~ p_z = N(0, I) to samples G(z); the distribution of those samples is p_g. A
discriminator D(x) ∈ (0, 1) is the probability that x came from the data rather than from G. The two
play a two-player minimax game with value function (eq. 1)

    min_G max_D V(D, G) = E_{x~p_data}[log D(x)] + E_{z~p_z}[log(1 - D(G(z)))]

D is trained to tell real from generated (a logistic regression: the value is minus the binary
cross-entropy of "real" on data and "fake" on samples), G to make D wrong.

**Proposition 1 (the optimal discriminator).** For a fixed G, V(D, G) = ∫ p_data(x) log D(x) + p_g(x)
log(1 - D(x)) dx, and a log y + b log(1 - y) is maximised on (0, 1) at y = a / (a + b), so

    D*_G(x) = p_data(x) / (p_data(x) + p_g(x))

**Theorem 1 (the global optimum).** Put D* back into V: the *virtual training criterion*

    C(G) = max_D V(D, G) = E_{p_data}[log D*(x)] + E_{p_g}[log(1 - D*(x))]
         = -log 4 + KL(p_data ‖ (p_data + p_g)/2) + KL(p_g ‖ (p_data + p_g)/2)
         = -log 4 + 2 · JSD(p_data ‖ p_g)

The Jensen-Shannon divergence is ≥ 0 and is 0 only when the two distributions are equal, so the global
minimum of C(G) is -log 4, reached if and only if p_g = p_data; D* is then 1/2 everywhere. (The tests
check both on a 1-D problem with known densities: a trained D approaches D*, and max_D V = -log 4 + 2 JSD.)

**Algorithm 1.** Alternate: k steps of ascending V in D's parameters on a minibatch of m data and m
samples, then one step of descending V in G's, on m fresh samples. D is kept near its optimum for the
current G, so that G's steps descend C(G) (Proposition 2: with enough capacity, p_g converges to p_data).
The paper used k = 1, "the least expensive option".

**The non-saturating generator loss (§3).** Early in training G is poor, D rejects its samples with high
confidence, and log(1 - D(G(z))) saturates: with D = σ(a) for a logit a, its gradient with respect to a
is -σ(a) = -D(G(z)) ≈ 0. "Rather than training G to minimize log(1 - D(G(z))) we can train G to maximize
log D(G(z))": the same fixed point of the dynamics, but the gradient -(1 - σ(a)) ≈ -1 is strong exactly
when G is worst. Both are here (`generator_loss`), the non-saturating one by default.

**Numerics.** Every log is taken of a sigmoid of the discriminator's logit a, in the stable form
log σ(a) = -softplus(-a) and log(1 - σ(a)) = -softplus(a): binary cross-entropy with logits. D returns the
logit; D(x) = σ(a) only for reporting.

**The networks.** The paper's MNIST generator was an MLP of rectifiers and sigmoids, its discriminator an
MLP of maxout units with dropout. Here: G an MLP of leaky rectifiers with a sigmoid output (784 pixels in
(0, 1), shaped [B, 1, 28, 28]), D an MLP of LeakyReLUs (instead of maxout) with dropout, one logit per
image. (No batch normalization: its statistics would be each rank's, not the global batch's.)
`GAN` holds the two as `generator` and `discriminator`: each has its own optimizer in the config, and
`parallel_units()` tells FSDP2 that they are called separately (each is sharded as a root of its own).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Range
from papertrain.errors import PapertrainError

IMAGE_SHAPE = (1, 28, 28)  # MNIST: one grey channel of 28 x 28 pixels in [0, 1]
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]  # 784
LOG_4 = math.log(4.0)  # -log 4 = C(G) at the global optimum p_g = p_data (Theorem 1)

GeneratorLoss = Literal["non_saturating", "minimax"]
GENERATOR_LOSSES = ("non_saturating", "minimax")


# -- the value function and the losses ----------------------------------------------------------------
def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 (or fp64 if they are): the logs of the losses are not taken in bf16/fp16."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-V(D, G) on a minibatch, which D minimises (i.e. ascends V, eq. 1):

        -(1/m Σ log D(x_i) + 1/m Σ log(1 - D(G(z_i))))

    real_logits: D's logits on data [m]; fake_logits: on generated samples [m'] -> a scalar. In logits:
    log D(x) = log σ(a) and log(1 - D(G(z))) = log σ(-a), i.e. BCE with target 1 on data, 0 on samples."""
    real, fake = at_least_fp32(real_logits), at_least_fp32(fake_logits)
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))  # -E log D(x)
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))  # -E log(1 - D(G(z)))


def generator_loss(fake_logits: torch.Tensor, kind: GeneratorLoss = "non_saturating") -> torch.Tensor:
    """What G minimises, from D's logits on its samples [m] -> a scalar.

    minimax:         1/m Σ log(1 - D(G(z_i)))    the term of V that depends on G (eq. 1); ≤ 0
    non_saturating: -1/m Σ log D(G(z_i))         §3: maximise log D(G(z)) instead; ≥ 0
    """
    a = at_least_fp32(fake_logits)
    if kind == "non_saturating":
        return F.binary_cross_entropy_with_logits(a, torch.ones_like(a))  # -log σ(a)
    if kind == "minimax":
        return -F.binary_cross_entropy_with_logits(a, torch.zeros_like(a))  # log(1 - σ(a)) = -softplus(a)
    raise PapertrainError(f"generator_loss='{kind}' is not a GAN generator loss",
                          f"use one of: {', '.join(GENERATOR_LOSSES)}")


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Proposition 1: D*_G(x) = p_data(x) / (p_data(x) + p_g(x)), from the two densities at the same points."""
    return p_data / (p_data + p_g)


# -- the two players ----------------------------------------------------------------------------------
class Generator(nn.Module):
    """G: noise z [B, latent_dim] -> images [B, 1, 28, 28] in (0, 1).

    Hidden layers of leaky rectifiers, then 784 sigmoid pixels (the paper's generator: "a mixture of
    rectifier linear activations and sigmoid activations"; with plain ReLUs ours collapsed to one blob
    within 2,000 steps in a loop with the tiny config's settings, see the README)."""

    def __init__(self, latent_dim: PositiveInt = 64, hidden: list[PositiveInt] = (256, 512),
                 negative_slope: PositiveFloat = 0.2):
        super().__init__()
        self.latent_dim, self.negative_slope = latent_dim, negative_slope
        sizes = [latent_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(sizes[-1], PIXELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise PapertrainError(f"the generator takes noise of shape [B, {self.latent_dim}], got {list(z.shape)}",
                                  f"draw z with torch.randn(B, {self.latent_dim})")
        h = z  # [B, latent_dim]
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), self.negative_slope)  # [B, hidden_i]
        return torch.sigmoid(self.output(h)).view(-1, *IMAGE_SHAPE)  # [B, 784] -> [B, 1, 28, 28]


class Discriminator(nn.Module):
    """D: images [B, 1, 28, 28] -> logits a [B], D(x) = σ(a).

    Hidden layers of LeakyReLUs, each followed by dropout (the paper: maxout units and dropout)."""

    def __init__(self, hidden: list[PositiveInt] = (512, 256), dropout: Annotated[float, Range(ge=0, lt=1)] = 0.3,
                 negative_slope: PositiveFloat = 0.2):
        super().__init__()
        self.negative_slope = negative_slope
        sizes = [PIXELS, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(sizes[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise PapertrainError(f"the discriminator takes images of shape {list(IMAGE_SHAPE)}, "
                                  f"got {list(x.shape[1:])}",
                                  "use 28x28 grey images (data.dataset=mnist or fashion_mnist)")
        h = x.flatten(1)  # [B, 784]
        for layer in self.hidden:
            h = self.dropout(F.leaky_relu(layer(h), self.negative_slope))  # [B, hidden_i]
        return self.output(h).squeeze(-1)  # [B]


class GAN(nn.Module):
    """The two players, `generator` and `discriminator`, each trained by its own optimizer (the config's
    `optimizers.generator` and `optimizers.discriminator` name these submodules)."""

    def __init__(self, latent_dim: PositiveInt = 64, generator_hidden: list[PositiveInt] = (256, 512),
                 discriminator_hidden: list[PositiveInt] = (512, 256),
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.3, negative_slope: PositiveFloat = 0.2):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_shape = IMAGE_SHAPE
        self.generator = Generator(latent_dim, list(generator_hidden), negative_slope)
        self.discriminator = Discriminator(list(discriminator_hidden), dropout, negative_slope)

    def parallel_units(self) -> list[str]:
        """Called separately (G on noise, D on data and on G's samples): FSDP2 shards each as its own root."""
        return ["generator", "discriminator"]

    @property
    def display_name(self) -> str:
        g = [self.latent_dim, *[layer.out_features for layer in self.generator.hidden], PIXELS]
        d = [PIXELS, *[layer.out_features for layer in self.discriminator.hidden], 1]
        return f"GAN (G: MLP {'-'.join(map(str, g))}, D: MLP {'-'.join(map(str, d))})"
