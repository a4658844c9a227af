"""
# Batch Normalization (Ioffe & Szegedy, 2015)

"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift" normalizes
each feature (each channel of a convolution) with the statistics of the current mini-batch, then lets the
network undo it if it wants, with a learned scale γ and shift β (Algorithm 1):

    μ_B = 1/m Σᵢ xᵢ                         the batch mean, per channel
    σ²_B = 1/m Σᵢ (xᵢ - μ_B)²                the batch variance (biased: divides by m)
    x̂ᵢ = (xᵢ - μ_B) / √(σ²_B + ε)
    yᵢ = γ x̂ᵢ + β

For a convolution the m values of a channel are all its positions in all images of the batch, B·H·W of
them (§3.2: "we jointly normalize all the activations in a mini-batch, over all locations").

**Inference.** A prediction must not depend on which other examples share its batch, so at test time the
network uses population statistics instead (Algorithm 2, step 10): E[x] and Var[x] estimated during
training. We keep exponential moving averages, as everyone has since the paper's code:

    running_mean ← (1 - momentum) running_mean + momentum μ_B
    running_var  ← (1 - momentum) running_var  + momentum σ²_B · m/(m - 1)     (the unbiased variance)

**Many processes.** With data parallelism each rank sees only its share of the batch. If each normalized
with its own share, N ranks would compute something different from one process with the whole batch. So,
like torch's SyncBatchNorm, the sums Σx, Σx² and m are added across ranks with a differentiable all-reduce
before μ_B and σ²_B are formed: the statistics are those of the global batch, and so are their gradients.
(Gradient accumulation still splits a step's batch into micro-batches, each with its own statistics.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from papertrain.config.constraints import PositiveFloat, PositiveInt, Probability


def summed_over_ranks(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the data-parallel ranks, differentiably (one process: unchanged)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors)
    from torch.distributed.nn.functional import all_reduce

    packed = all_reduce(torch.cat([t.reshape(-1) for t in tensors]))  # one message for all the sums
    return [piece.view_as(t) for piece, t in zip(packed.split([t.numel() for t in tensors]), tensors)]


def batch_moments(x: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ_B, σ²_B, m) per channel over the batch and all positions; over every rank's batch if `sync`.

    Always in fp32, whatever autocast made of x: E[x²] - μ² subtracts two nearly equal numbers, which in
    bf16 (8 bits of mantissa) leaves mostly rounding error, and the running averages must stay fp32 too
    (torch's own BatchNorm computes its statistics in fp32 under autocast for the same reason)."""
    x = x.float()
    dims = [0, *range(2, x.dim())]
    count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype)
    sums = (x.sum(dims), (x * x).sum(dims), count)
    total, squares, m = summed_over_ranks(*sums) if sync else sums
    mean = total / m  # μ_B
    return mean, (squares / m - mean * mean).clamp_min(0.0), m  # σ²_B = E[x²] - μ_B² (biased)


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [C] vector shaped to broadcast over [B, C, *spatial]."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class BatchNorm(nn.Module):
    """BatchNorm over dimension 1 of [B, C] or [B, C, *spatial] inputs: Algorithms 1 and 2 of the paper."""

    def __init__(self, num_features: PositiveInt, eps: PositiveFloat = 1e-5, momentum: Probability = 0.1,
                 affine: bool = True, track_running_stats: bool = True, sync: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.sync = sync  # global-batch statistics across data-parallel ranks
        self.weight = nn.Parameter(torch.empty(num_features)) if affine else None  # γ
        self.bias = nn.Parameter(torch.empty(num_features)) if affine else None  # β
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features))
            self.register_buffer("running_var", torch.empty(num_features))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.track_running_stats:
            mean, var, m = batch_moments(x, self.sync)
            if self.training and self.track_running_stats:
                with torch.no_grad():  # Algorithm 2's population estimates, as moving averages
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var * m / (m - 1).clamp_min(1.0), self.momentum)
                    self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var  # inference: population statistics
        x32 = x.float()
        x_hat = (x32 - per_channel(mean, x)) * per_channel(torch.rsqrt(var + self.eps), x)  # (x - μ)/√(σ² + ε)
        if self.weight is not None:
            x_hat = x_hat * per_channel(self.weight, x) + per_channel(self.bias, x)  # y = γ x̂ + β
        return x_hat.to(x.dtype)  # back to the input's precision (a no-op in fp32)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"
