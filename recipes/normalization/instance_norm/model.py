"""
# Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016)

"Instance Normalization: The Missing Ingredient for Fast Stylization" replaces batch normalization in a
style-transfer generator by normalizing each *image's* channels on their own (eq. 2):

    μ_ti = 1/(HW) Σ_l Σ_m x_tilm,    σ²_ti = 1/(HW) Σ_l Σ_m (x_tilm - μ_ti)²,
    y_tijk = (x_tijk - μ_ti) / √(σ²_ti + ε)

for image t and channel i. The contrast of each feature map in each image is removed, which is what a
stylized output should not depend on. Compared with batch normalization (statistics over t, l and m),
only the sum over the batch index t is gone; compared with layer normalization (over i, l and m), the
channels are kept apart.

The paper applies it at test time too ("we propose to ... apply instance normalization at test time as
well"), which is the default here (`track_running_stats=False`). For torch.nn.InstanceNorm's optional
running statistics (`track_running_stats=True`), training also keeps moving averages of the mean over
images of μ_ti and of the unbiased σ²_ti, and evaluation normalizes with those.
"""

from __future__ import annotations

import torch
from torch import nn


class InstanceNorm(nn.Module):
    """Per image and channel, over the positions of [B, C, *spatial] inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.empty(num_features)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.empty(num_features))
            self.register_buffer("running_var", torch.empty(num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"InstanceNorm needs [B, C, *spatial] inputs, got shape {tuple(x.shape)}")
        positions = tuple(range(2, x.dim()))  # l, m: every position of one channel of one image
        channel = (1, -1) + (1,) * (x.dim() - 2)
        if self.training or not self.track_running_stats:
            mean = x.mean(positions, keepdim=True)  # μ_ti: [B, C, 1, 1]
            var = x.var(positions, keepdim=True, unbiased=False)  # σ²_ti
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    n = x[0, 0].numel()
                    self.running_mean.lerp_(mean.mean(0).flatten(), self.momentum)
                    self.running_var.lerp_((var * n / max(n - 1, 1)).mean(0).flatten(), self.momentum)
        else:
            mean, var = self.running_mean.view(channel), self.running_var.view(channel)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return y
        return y * self.weight.view(channel) + self.bias.view(channel)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"
