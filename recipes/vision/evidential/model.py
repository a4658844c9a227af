"""
# Evidential deep learning (Sensoy, Kaplan & Kandemir, NeurIPS 2018)

A softmax classifier always answers with probabilities that sum to 1, so it cannot say "I don't know":
shown a digit rotated until it is no digit at all, it still puts most of its mass on some class.
"Evidential Deep Learning to Quantify Classification Uncertainty" makes the network output *evidence*
instead, and reads it with subjective logic (§3): for K classes and non-negative evidence e_k,

    α_k = e_k + 1,    S = Σ_k α_k,    belief b_k = e_k / S,    uncertainty u = K / S

so that u + Σ_k b_k = 1. No evidence at all gives u = 1; evidence piles up as S grows and u shrinks.
The α_k are the parameters of a Dirichlet distribution over the class probabilities p, whose mean
p̂_k = α_k / S is the prediction. The network's last layer is kept, only its softmax is replaced by a
non-negative activation: ReLU in the paper; softplus and exp are the other choices (`evidence=`).

**Which activation.** With ReLU, a class whose output is negative gets zero evidence *and zero gradient*
from every example: the loss pushes the wrong classes' outputs down, a class's output can fall below
zero on its own digits too, and then nothing brings it back. In our run (the README) ReLU evidence
left three classes dead and stalled at 67% accuracy after two epochs, where exp evidence (e = eˣ,
positive everywhere, so every class always has a gradient) reached 98.8%. The tiny config therefore uses
exp; `task.evidence=relu` is the paper's setting.

**The loss (§3, eqs. 3-5).** Instead of the cross-entropy of one prediction, minimise the *expected*
loss under the Dirichlet, ∫ L(y, p) Dir(p | α) dp. For the squared error this has a closed form, eq. 5,
the paper's main choice:

    L_i = Σ_j (y_j - p̂_j)² + p̂_j (1 - p̂_j) / (S + 1)           (error term + variance term)

(eq. 3, the Dirichlet's marginal likelihood, is Σ_j y_j (log S - log α_j); eq. 4, the expected
cross-entropy, is Σ_j y_j (ψ(S) - ψ(α_j)); both are here as `loss=log` and `loss=digamma`.)

**Unlearning misleading evidence (eq. 6).** Nothing in L_i stops the network from also producing
evidence for wrong classes. The paper adds a KL term that pulls the Dirichlet, *with the true class's
evidence removed*, towards the uniform Dirichlet Dir(1, ..., 1) (total uncertainty):

    α̃ = y + (1 - y) ⊙ α,        L = Σ_i L_i + λ_t KL[Dir(p | α̃) ‖ Dir(p | 1)]

    KL[Dir(α̃) ‖ Dir(1)] = log Γ(Σ_k α̃_k) - log Γ(K) - Σ_k log Γ(α̃_k) + Σ_k (α̃_k - 1)(ψ(α̃_k) - ψ(Σ_j α̃_j))

λ_t = min(1, t/10), t the epoch, anneals the term in slowly, so that the network first learns the
classes before it is told to doubt. We count t in optimizer steps: λ_t = min(1, t / `annealing_steps`).

**The step count.** The loss reads t from the training loop's context (`ctx.step`, the optimizer steps
taken before this one), so the annealing resumes exactly with the run and is the same on every rank.

The network is the paper's LeNet: two 5x5 convolutions (20 and 50 filters) with max pooling, a fully
connected layer of 500 units, and K outputs read as evidence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt
from papertrain.errors import PapertrainError

Evidence = Literal["relu", "softplus", "exp"]
Loss = Literal["mse", "log", "digamma"]
IMAGE_SHAPE = (1, 28, 28)


def to_evidence(outputs: torch.Tensor, kind: Evidence = "relu") -> torch.Tensor:
    """e = ReLU(outputs) (the paper), softplus or exp (clamped so that e stays finite): [B, K] >= 0."""
    if kind == "relu":
        return F.relu(outputs)
    if kind == "softplus":
        return F.softplus(outputs)
    if kind == "exp":
        return torch.exp(outputs.clamp(-10, 10))
    raise PapertrainError(f"evidence={kind!r} is not an evidence function", "use relu (the paper), softplus or exp")


def opinion(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subjective logic from Dirichlet parameters α [B, K]: belief b = (α - 1)/S [B, K], uncertainty
    u = K/S [B] and the expected probabilities p̂ = α/S [B, K]."""
    strength = alpha.sum(dim=-1, keepdim=True)  # S
    return (alpha - 1) / strength, alpha.shape[-1] / strength.squeeze(-1), alpha / strength


def expected_squared_error(alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """eq. 5: Σ_j (y_j - p̂_j)² + p̂_j (1 - p̂_j)/(S + 1), per example. α, y (one-hot): [B, K] -> [B]."""
    strength = alpha.sum(dim=-1, keepdim=True)
    p = alpha / strength
    return ((y - p) ** 2 + p * (1 - p) / (strength + 1)).sum(dim=-1)


def expected_log_loss(alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """eq. 3: Σ_j y_j (log S - log α_j), the negative log of the Dirichlet's marginal likelihood. [B]"""
    return (y * (alpha.sum(dim=-1, keepdim=True).log() - alpha.log())).sum(dim=-1)


def expected_cross_entropy(alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """eq. 4: Σ_j y_j (ψ(S) - ψ(α_j)), the cross-entropy expected under Dir(α). [B]"""
    return (y * (torch.digamma(alpha.sum(dim=-1, keepdim=True)) - torch.digamma(alpha))).sum(dim=-1)


LOSSES = {"mse": expected_squared_error, "log": expected_log_loss, "digamma": expected_cross_entropy}


def kl_to_uniform_dirichlet(alpha: torch.Tensor) -> torch.Tensor:
    """KL[Dir(α) ‖ Dir(1, ..., 1)] in closed form, per example: [B, K] -> [B].

    log Γ(Σα) - log Γ(K) - Σ log Γ(α_k) + Σ (α_k - 1)(ψ(α_k) - ψ(Σα))
    """
    k = alpha.shape[-1]
    total = alpha.sum(dim=-1)
    log_normalisers = torch.lgamma(total) - math.lgamma(k) - torch.lgamma(alpha).sum(dim=-1)
    return log_normalisers + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(total)[:, None])).sum(dim=-1)


def evidential_loss(outputs: torch.Tensor, labels: torch.Tensor, annealing: float, loss: Loss = "mse",
                    evidence: Evidence = "relu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean_i [L_i + λ_t KL(Dir(α̃_i) ‖ Dir(1))] with α = evidence(outputs) + 1 and α̃ = y + (1 - y) ⊙ α.

    outputs: [B, K] (the network's last layer), labels: [B], annealing: λ_t in [0, 1].
    """
    if loss not in LOSSES:
        raise PapertrainError(f"loss={loss!r} is not one of the paper's losses", "use mse (eq. 5), log (eq. 3) or "
                              "digamma (eq. 4)")
    alpha = to_evidence(outputs.float(), evidence) + 1  # [B, K]
    y = F.one_hot(labels, alpha.shape[-1]).to(alpha.dtype)
    fit = LOSSES[loss](alpha, y)  # L_i
    alpha_tilde = y + (1 - y) * alpha  # the true class's evidence removed: only misleading evidence is left
    kl = kl_to_uniform_dirichlet(alpha_tilde)
    _, u, p = opinion(alpha)
    parts = {"fit": fit.mean().detach(), "kl": kl.mean().detach(),
             "annealing": torch.tensor(float(annealing), device=alpha.device),
             "uncertainty": u.mean().detach(), "accuracy": (p.argmax(-1) == labels).float().mean().detach()}
    return (fit + annealing * kl).mean(), parts


class EvidentialLeNet(nn.Module):
    """LeNet (conv 5x5 x `channels[0]`, pool, conv 5x5 x `channels[1]`, pool, fc `hidden`, fc K) whose K
    outputs are read as evidence."""

    def __init__(self, num_classes: PositiveInt = 10, channels: tuple[PositiveInt, PositiveInt] = (20, 50),
                 hidden: PositiveInt = 500):
        super().__init__()
        self.num_classes = num_classes
        self.image_shape = IMAGE_SHAPE
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=5)  # 12 -> 8, pooled to 4
        self.fc = nn.Linear(channels[1] * 4 * 4, hidden)
        self.output = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 1, 28, 28] -> outputs [B, K] (evidence = ReLU/softplus/exp of these)."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise PapertrainError(f"EvidentialLeNet takes images of shape {list(self.image_shape)}, got "
                                  f"{list(images.shape[1:])}", "use 28x28 grey images (data.dataset=mnist)")
        h = F.max_pool2d(F.relu(self.conv1(images)), 2)  # [B, c1, 12, 12]
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [B, c2, 4, 4]
        return self.output(F.relu(self.fc(h.flatten(1))))


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate [B, C, H, W] images about their centre (bilinear, zeros outside), as the paper's Fig. 3 does."""
    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]],
                          dtype=images.dtype, device=images.device).expand(len(images), 2, 3)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
