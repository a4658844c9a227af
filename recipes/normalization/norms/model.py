"""
# Normalization layers compared on one image classifier

Every normalization layer computes x̂ = (x - μ) / √(σ² + ε) followed by a learned per-channel γ x̂ + β;
they differ only in *which values share μ and σ²*. For a batch of feature maps x[n, c, h, w]:

    layer                         μ, σ² over                      depends on the batch?   recipe
    BatchNorm (Ioffe & Szegedy)   n, h, w       (per channel)     yes: training ≠ eval    batch_norm
    LayerNorm (Ba et al.)         c, h, w       (per image)       no                      layer_norm
    InstanceNorm (Ulyanov et al.) h, w          (per image, channel) no                   instance_norm
    GroupNorm (Wu & He)           C/G channels, h, w (per image)  no                      group_norm
    Batch-Channel Norm (Qiao)     BatchNorm, then GroupNorm       yes (or its estimates)  batch_channel_norm
    Weight Standardization        the *weights* of each filter    no                      weight_standardization

`NormConvNet` is one small convolutional network whose normalization is a config choice, so the layers can
be compared on the same data with everything else fixed: three 3x3 convolutions (each followed by the
normalization and a ReLU, the first two by 2x2 max-pooling), global average pooling and a linear classifier.
Each layer's own file (see the table) is where its idea lives; this file only assembles them.
`papertrain compare norms` trains the network once per normalization on MNIST (see meta.yaml).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Range
from papertrain.errors import PapertrainError
from papertrain.recipes.normalization.batch_channel_norm.model import BatchChannelNorm
from papertrain.recipes.normalization.batch_norm.model import BatchNorm
from papertrain.recipes.normalization.group_norm.model import GroupNorm
from papertrain.recipes.normalization.instance_norm.model import InstanceNorm
from papertrain.recipes.normalization.layer_norm.model import LayerNorm
from papertrain.recipes.normalization.weight_standardization.model import WSConv2d

Norm = Literal["none", "batch", "layer", "instance", "group", "batch_channel"]
NORMS: tuple[str, ...] = ("none", "batch", "layer", "instance", "group", "batch_channel")


def make_norm(norm: str, channels: int, size: int, groups: int, estimate: bool) -> nn.Module:
    """The normalization for `channels` feature maps of `size` x `size` pixels."""
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return BatchNorm(channels)
    if norm == "layer":
        return LayerNorm((channels, size, size))  # every unit of one image, each with its own gain and bias
    if norm == "instance":
        return InstanceNorm(channels, affine=True)
    if norm == "group":
        return GroupNorm(groups, channels)
    if norm == "batch_channel":
        return BatchChannelNorm(channels, groups, estimate=estimate)
    raise PapertrainError(f"model.norm='{norm}' is not a normalization here", f"use one of: {', '.join(NORMS)}")


class NormConvNet(nn.Module):
    """[B, 1, 28, 28] images -> [B, num_classes] logits, with the chosen normalization after each convolution."""

    def __init__(self, norm: Norm = "batch",
                 channels: Annotated[tuple[int, int, int] | list[int], Range(ge=1)] = (16, 32, 64),  # each >= 1
                 num_classes: PositiveInt = 10, image_size: PositiveInt = 28, in_channels: PositiveInt = 1,
                 groups: PositiveInt = 8, weight_standardization: bool = False, estimate: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise PapertrainError(f"model.norm='{norm}' is not a normalization here", f"use one of: {', '.join(NORMS)}")
        if any(c % groups for c in channels) and norm in ("group", "batch_channel"):
            raise PapertrainError(f"model.channels={list(channels)} must all be divisible by model.groups={groups}",
                                  "choose channel counts that are multiples of the group count")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        size, previous = image_size, in_channels
        for index, width in enumerate(channels):
            # a convolution followed by a normalization needs no bias: the norm's β replaces it
            bias = norm == "none"
            conv = (WSConv2d(previous, width, 3, padding=1, bias=bias) if weight_standardization
                    else nn.Conv2d(previous, width, 3, padding=1, bias=bias))
            self.convs.append(conv)
            self.norms.append(make_norm(norm, width, size, groups, estimate))
            if index < len(channels) - 1:
                size //= 2  # max-pooling after all but the last block
            previous = width
        self.classifier = nn.Linear(previous, num_classes)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """Group-wise norms split each layer's channels into `groups`; every block but the last halves the
        image, which must keep at least one pixel."""
        channels, groups, norm = list(arguments["channels"]), arguments["groups"], arguments["norm"]
        if norm in ("group", "batch_channel") and any(c % groups for c in channels):
            yield "groups", (f"channels={channels} must all be divisible by groups={groups} for norm={norm}; "
                             "choose channel counts that are multiples of the group count")
        halvings = max(len(channels) - 1, 0)
        if arguments["image_size"] < 2**halvings:
            yield "image_size", (f"image_size={arguments['image_size']} is too small for {len(channels)} blocks: "
                                 f"max-pooling halves it {halvings} times; use image_size >= {2**halvings} "
                                 "or fewer channels")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise PapertrainError(f"NormConvNet expects images of {self.in_channels}x{self.image_size}x"
                                  f"{self.image_size}, got {tuple(images.shape[1:])}",
                                  "set model.image_size and model.in_channels to the data's")
        x = images
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if index < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.mean((2, 3)))  # global average pooling, then the classes
