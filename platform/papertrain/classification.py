"""Image classification as a task: cross-entropy on labelled images, accuracy on the validation set.

Shared by the recipes that train classifiers (the normalization layers, distillation, evidential deep
learning). The model maps images [B, C, H, W] to logits [B, K]; the data is an `ImageClassification`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt
from papertrain.errors import PapertrainError


class ClassificationTask:
    unit = "samples"

    def __init__(self, sample_images: PositiveInt = 16):
        self.sample_images = sample_images

    def prepare(self, model: nn.Module, data: Any) -> None:
        classes = getattr(model, "num_classes", None)
        if classes is not None and classes != data.num_classes:
            raise PapertrainError(f"model.num_classes={classes} but {data.dataset} has {data.num_classes} classes",
                                  f"set model.num_classes={data.num_classes}")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["image"]).float()  # [B, K]
        correct = (logits.argmax(-1) == batch["label"]).float().mean()
        return F.cross_entropy(logits, batch["label"]), {"accuracy": correct.detach()}

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, extra = self.loss(model, batch)
        return {"loss": float(loss), "accuracy": float(extra["accuracy"]), "error": 1.0 - float(extra["accuracy"])}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["label"])

    def sample(self, model: nn.Module, data: Any, generator: torch.Generator) -> dict[str, Any]:
        """A grid of validation images titled with the prediction (red where it is wrong)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = min(self.sample_images, len(data.val))
        batch = data.val.batch(torch.randperm(len(data.val), generator=generator)[:count])
        device = next(model.parameters()).device
        with torch.no_grad():
            probabilities = model(batch["image"].to(device)).float().softmax(-1).cpu()
        columns = min(8, count)
        rows = (count + columns - 1) // columns
        figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
        for i, axis in enumerate(axes.flat):
            axis.axis("off")
            if i >= count:
                continue
            guess = int(probabilities[i].argmax())
            axis.imshow(batch["image"][i, 0].numpy(), cmap="gray")
            axis.set_title(f"{data.class_names[guess]} {probabilities[i, guess]:.0%}", fontsize=8,
                           color="black" if guess == int(batch["label"][i]) else "red")
        figure.tight_layout()
        return {"predictions": figure}
