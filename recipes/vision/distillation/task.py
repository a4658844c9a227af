"""Distillation as a task: the teacher, built once, then the student on soft targets and labels.

The teacher is part of the recipe, not a manual step. It is an *artifact* (papertrain/artifacts.py): a
`TrainedModel` whose config `teacher_config` derives from these settings and the student's data, trained
by the same engine loop as any run (its own run directory in the cache, progress bar, checkpoints and
resume), once per machine, and cached under a hash of its config. The student's run is the same whether
the teacher came from the cache or was just trained: the artifact stage restores the random generators.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.artifacts import TrainedModel
from papertrain.classification import ClassificationTask
from papertrain.config.constraints import NonNegativeInt, PositiveFloat, PositiveInt, Probability, Range, Seed
from papertrain.errors import PapertrainError
from papertrain.recipes.vision.distillation.model import MLP, distillation_loss

TEACHER_NAME = "distillation-teacher-v2"  # change it when the teacher's training changes: a new cache entry


class DistillationTask(ClassificationTask):
    """L = α T² KL(teacher ‖ student at T) + (1 - α) CE(y, student); α = 0 trains the student alone.

    The teacher: an MLP with `teacher_hidden` ReLU layers and `teacher_dropout`, trained with Adam for
    `teacher_steps` steps of `teacher_batch_size` on the same training images as the student, each image
    shifted by up to `teacher_jitter` pixels in each direction (the paper's teacher: dropout and 2-pixel
    jitter; its student: neither).
    """

    def __init__(self, temperature: PositiveFloat = 20.0, alpha: Probability = 0.9,
                 teacher_hidden: list[PositiveInt] = (1200, 1200),
                 teacher_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.3,
                 teacher_jitter: NonNegativeInt = 2, teacher_steps: PositiveInt = 5000,
                 teacher_batch_size: PositiveInt = 128, teacher_lr: PositiveFloat = 1e-3, teacher_seed: Seed = 0,
                 teacher_path: str | None = None):
        if temperature <= 0:
            raise PapertrainError(f"task.temperature={temperature} must be > 0",
                                  "use e.g. task.temperature=20 (the paper's MNIST)")
        if not 0.0 <= alpha <= 1.0:
            raise PapertrainError(f"task.alpha={alpha} must lie in [0, 1] (the weight of the soft targets)",
                                  "use e.g. task.alpha=0.9, or task.alpha=0 to train the student alone")
        if teacher_steps < 1 or teacher_batch_size < 1:
            raise PapertrainError(f"task.teacher_steps={teacher_steps} and task.teacher_batch_size="
                                  f"{teacher_batch_size} must be positive", "use e.g. teacher_steps=2000")
        self.temperature, self.alpha = temperature, alpha
        if not 0 <= teacher_jitter <= 4:
            raise PapertrainError(f"task.teacher_jitter={teacher_jitter} must be 0..4 pixels",
                                  "use the paper's 2 (shifts of up to two pixels in any direction), or 0")
        self.teacher_settings = {"hidden": [int(n) for n in teacher_hidden], "dropout": float(teacher_dropout),
                                 "jitter": int(teacher_jitter),
                                 "steps": int(teacher_steps), "batch_size": int(teacher_batch_size),
                                 "lr": float(teacher_lr), "seed": int(teacher_seed)}
        self.teacher_path = teacher_path
        self.teacher: nn.Module | None = None
        super().__init__()

    # -- the teacher ----------------------------------------------------------------------------------
    def teacher_config(self, student: dict[str, Any]) -> dict[str, Any]:
        """The teacher's run, as a config tree: the student's data, an MLP with dropout, jittered inputs,
        Adam for `teacher_steps` steps of `teacher_batch_size`, evaluated on every validation image."""
        settings = self.teacher_settings
        return {
            "name": TEACHER_NAME, "seed": settings["seed"], "data": student["data"],
            "model": {"_component_": "papertrain.recipes.vision.distillation.model.MLP", "hidden": settings["hidden"],
                      "num_classes": student["model"].get("num_classes", 10), "dropout": settings["dropout"]},
            "task": {"_component_": "papertrain.recipes.vision.distillation.task.JitteredClassificationTask",
                     "jitter": settings["jitter"]},
            "optimizer": {"_component_": "torch.optim.Adam", "lr": settings["lr"]},
            "trainer": {"max_steps": settings["steps"], "batch_size": settings["batch_size"], "precision": "fp32",
                        "eval_batches": 10_000 // settings["batch_size"] + 1, "eval_every": 0, "sample_every": -1,
                        "log_every": max(1, settings["steps"] // 50), "checkpoint_every": max(1, settings["steps"] // 5),
                        "progress": student.get("trainer", {}).get("progress", "auto"), "tensorboard": False},
        }

    def artifacts(self, ctx: Any) -> dict[str, Any]:
        if self.alpha == 0.0 or self.teacher_path:
            return {}  # the student alone, or a teacher of your own
        return {"teacher": TrainedModel(self.teacher_config(ctx.config))}

    def use_artifacts(self, built: dict[str, Any]) -> None:
        self.teacher = built.get("teacher")

    def prepare(self, model: nn.Module, data: Any) -> None:
        super().prepare(model, data)  # the model's classes are the data's
        if tuple(getattr(data, "image_shape", (1, 28, 28))) != tuple(getattr(model, "image_shape", (1, 28, 28))):
            raise PapertrainError(f"the student takes images of shape {list(model.image_shape)}, the data has "
                                  f"{list(data.image_shape)}", "use 28x28 grey images (mnist or fashion_mnist)")
        if self.alpha > 0.0 and self.teacher_path:
            self.teacher = self.load_teacher_file(Path(self.teacher_path).expanduser(), data,
                                                  next(model.parameters()).device)

    def load_teacher_file(self, path: Path, data: Any, device: torch.device) -> nn.Module:
        """`task.teacher_path`: a teacher's weights (safetensors) with the shape `teacher_hidden` says."""
        from safetensors.torch import load_model

        if not path.is_file():
            raise PapertrainError(f"task.teacher_path={path} does not exist",
                                  "point it at a teacher's safetensors file, or set it to null to train one")
        teacher = MLP(self.teacher_settings["hidden"], data.num_classes, dropout=self.teacher_settings["dropout"])
        load_model(teacher, str(path))
        teacher = teacher.to(device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        return teacher

    # -- the student ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["image"])
        teacher_logits = None
        if self.alpha > 0:
            with torch.no_grad():
                teacher_logits = self._teacher()(batch["image"])
        loss, parts = distillation_loss(logits, teacher_logits, batch["label"], self.temperature, self.alpha)
        parts["accuracy"] = (logits.argmax(-1) == batch["label"]).float().mean().detach()
        return loss, parts

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The student's cross-entropy with the labels (comparable whatever α) and accuracy; the teacher's."""
        logits = model(batch["image"]).float()
        values = {"loss": float(F.cross_entropy(logits, batch["label"])),
                  "accuracy": float((logits.argmax(-1) == batch["label"]).float().mean())}
        if self.alpha > 0:
            teacher_logits = self._teacher()(batch["image"])
            values["teacher_accuracy"] = float((teacher_logits.argmax(-1) == batch["label"]).float().mean())
            values["distillation_loss"] = float(distillation_loss(logits, teacher_logits, batch["label"],
                                                                  self.temperature, self.alpha)[0])
        return values

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise PapertrainError("the distillation task has no teacher yet (prepare() was not called)",
                                  "run it through the trainer, or call task.prepare(model, data) first")
        return self.teacher


def jitter(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a random whole number of pixels in [-shift, shift] along each axis, zeros
    filling in: [B, C, H, W] -> [B, C, H, W]. (MNIST digits sit in a 20x20 box, so nothing is cut off.)"""
    if shift == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift, shift, shift, shift))
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator)
    out = torch.empty_like(images)
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            chosen = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
            out[chosen] = padded[chosen, :, dy:dy + h, dx:dx + w]
    return out


class JitteredClassificationTask(ClassificationTask):
    """The teacher's task: cross-entropy on images shifted by up to `jitter` pixels each way (the paper's
    teacher trained on jittered digits), drawn from the loop's per-step generator (`ctx.random`)."""

    def __init__(self, jitter: NonNegativeInt = 2, sample_images: PositiveInt = 16):
        super().__init__(sample_images)
        self.jitter = jitter

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Any
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = jitter(batch["image"], self.jitter, ctx.random("jitter", "cpu"))
        return super().loss(model, {**batch, "image": images})

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """On the upright validation digits, as the student is judged."""
        loss, extra = ClassificationTask.loss(self, model, batch)
        return {"loss": float(loss), "accuracy": float(extra["accuracy"]), "error": 1.0 - float(extra["accuracy"])}
