"""Evidential classification of MNIST digits: the loss of eq. 5 plus the annealed KL term, validation
accuracy and uncertainty, and the paper's Fig. 3 (a rotated "1": predictions and uncertainty by angle).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from papertrain.classification import ClassificationTask
from papertrain.config.constraints import NonNegativeInt
from papertrain.errors import PapertrainError
from papertrain.recipes.vision.evidential.model import LOSSES, evidential_loss, opinion, rotate, to_evidence

ANGLES = list(range(0, 181, 10))  # Fig. 3: 0° to 180°


class EvidentialTask(ClassificationTask):
    """loss:            mse (eq. 5, the paper's main choice), log (eq. 3) or digamma (eq. 4)
    evidence:        relu (the paper), softplus or exp
    annealing_steps: λ_t = min(1, t / annealing_steps), t = optimizer steps so far, read from the training
                     loop's context `ctx.step` (the paper: 10 epochs)
    rotated_digit:   the digit whose rotations the sample plots (the paper's Fig. 3 rotates a "1")
    """

    def __init__(self, loss: str = "mse", evidence: str = "relu", annealing_steps: NonNegativeInt = 1000,
                 rotated_digit: NonNegativeInt = 1):
        if loss not in LOSSES:
            raise PapertrainError(f"task.loss={loss!r} is not one of the paper's losses",
                                  "use task.loss=mse (eq. 5), log (eq. 3) or digamma (eq. 4)")
        if evidence not in ("relu", "softplus", "exp"):
            raise PapertrainError(f"task.evidence={evidence!r} is not an evidence function",
                                  "use task.evidence=relu (the paper), softplus or exp")
        if annealing_steps < 0:
            raise PapertrainError(f"task.annealing_steps={annealing_steps} must be >= 0",
                                  "use e.g. the steps of a few epochs (the paper: 10 epochs); 0 = λ_t = 1 from the start")
        self.loss_name, self.evidence, self.annealing_steps = loss, evidence, annealing_steps
        self.rotated_digit = rotated_digit
        super().__init__()

    def prepare(self, model: nn.Module, data: Any) -> None:
        super().prepare(model, data)  # the model's classes are the data's
        if not 0 <= self.rotated_digit < data.num_classes:
            raise PapertrainError(f"task.rotated_digit={self.rotated_digit} is not a class of {data.dataset}",
                                  f"use a class index in 0..{data.num_classes - 1}")

    def annealing(self, step: int) -> float:
        """λ_t = min(1, t / annealing_steps), with t = `step`, the optimizer steps taken before this one."""
        if self.annealing_steps == 0:
            return 1.0
        return min(1.0, step / self.annealing_steps)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Any
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        annealing = self.annealing(ctx.step)
        return evidential_loss(model(batch["image"]), batch["label"], annealing, self.loss_name, self.evidence)

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, Any]:
        """Loss (at the current λ_t), accuracy, mean uncertainty u, and u over the correct and the wrong answers."""
        outputs = model(batch["image"])
        loss, parts = evidential_loss(outputs, batch["label"], self.annealing(ctx.step), self.loss_name,
                                      self.evidence)
        _, u, p = opinion(to_evidence(outputs.float(), self.evidence) + 1)
        correct = p.argmax(-1) == batch["label"]
        return {"loss": loss, "accuracy": parts["accuracy"], "uncertainty": parts["uncertainty"],
                "uncertainty_correct": (float(u[correct].sum()), float(correct.sum())),
                "uncertainty_wrong": (float(u[~correct].sum()), float((~correct).sum()))}

    # -- Fig. 3 ---------------------------------------------------------------------------------------
    def rotation_curve(self, model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image [1, 28, 28] at every angle of ANGLES: (rotated images [A, 1, 28, 28], p̂ [A, K], u [A])."""
        images = torch.cat([rotate(image[None], angle) for angle in ANGLES])
        outputs = model(images.to(next(model.parameters()).device)).float()
        _, u, p = opinion(to_evidence(outputs, self.evidence) + 1)
        return images, p.cpu(), u.cpu()

    def mean_uncertainty(self, model: nn.Module, images: torch.Tensor, degrees: float = 0.0) -> float:
        """The mean u over `images` [N, 1, 28, 28], each rotated by `degrees`."""
        device = next(model.parameters()).device
        outputs = model(rotate(images, degrees).to(device) if degrees else images.to(device)).float()
        return float(opinion(to_evidence(outputs, self.evidence) + 1)[1].mean())

    def sample(self, model: nn.Module, data: Any, generator: torch.Generator) -> dict[str, Any]:
        """Fig. 3 for the first validation image of `rotated_digit`, and mean u upright vs rotated 90°."""
        labels = data.val.tensors["label"]
        images = data.val.tensors["image"][:1000]
        digit = data.val.tensors["image"][int((labels == self.rotated_digit).nonzero()[0])]
        rotated, p, u = self.rotation_curve(model, digit)
        return {"rotation": self._figure(rotated, p, u, data.class_names),
                "uncertainty_upright": self.mean_uncertainty(model, images),
                "uncertainty_rotated_90": self.mean_uncertainty(model, images, 90.0),
                "rotated_digit_uncertainty_0": float(u[0]), "rotated_digit_uncertainty_90": float(u[9])}

    def _figure(self, rotated: torch.Tensor, p: torch.Tensor, u: torch.Tensor, class_names: Any) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=(8, 4.2))
        top = figure.add_axes((0.08, 0.32, 0.72, 0.6))
        shown = [k for k in range(p.shape[1]) if float(p[:, k].max()) >= 0.2]  # classes that ever matter
        for k in shown:
            top.plot(ANGLES, p[:, k].numpy(), "o-", markersize=3, label=f"p̂({class_names[k]})")
        top.plot(ANGLES, u.numpy(), "k--", linewidth=2, label="uncertainty u = K/S")
        top.set_xlim(-5, 185)
        top.set_ylim(-0.02, 1.02)
        top.set_xlabel("rotation (degrees)")
        top.set_title(f'a rotated "{class_names[self.rotated_digit]}": expected probabilities and uncertainty',
                      fontsize=10)
        top.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        top.grid(alpha=0.3)
        strip = figure.add_axes((0.08, 0.02, 0.72, 0.13))
        strip.imshow(torch.cat(list(rotated[:, 0]), dim=1).numpy(), cmap="gray", aspect="auto")
        strip.axis("off")
        return figure
