"""In-memory examples: named tensors whose first dimension counts the examples."""

from __future__ import annotations

import torch


class TensorExamples:
    """`batch(indices)` returns every tensor at those rows, e.g. {"image": [B, 1, 28, 28], "label": [B]}."""

    def __init__(self, **tensors: torch.Tensor):
        sizes = {name: len(t) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all tensors need the same number of examples, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[indices] for name, t in self.tensors.items()}
