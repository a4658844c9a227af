"""Distillation as a task: train (or find) the teacher, then train the student on soft targets and labels.

The teacher is part of the recipe, not a manual step: `prepare` looks for a teacher trained with exactly
these settings in the data cache (`$PAPERTRAIN_DATA/distillation/teacher-<hash>.safetensors`) and
trains one if there is none, printing its progress. Its training draws from its own seeded generators
inside `torch.random.fork_rng`, so the student's run is the same whether the teacher came from the
cache or was just trained, and every rank of a distributed run computes the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.classification import ClassificationTask
from papertrain.config.constraints import NonNegativeInt, PositiveFloat, PositiveInt, Probability, Range, Seed
from papertrain.data.sources import cache_dir
from papertrain.errors import PapertrainError
from papertrain.recipes.vision.distillation.model import MLP, distillation_loss

TEACHER_VERSION = 1  # bump when the teacher's training changes, so that old cached teachers are not used


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
    def prepare(self, model: nn.Module, data: Any) -> None:
        super().prepare(model, data)  # the model's classes are the data's
        if tuple(getattr(data, "image_shape", (1, 28, 28))) != tuple(getattr(model, "image_shape", (1, 28, 28))):
            raise PapertrainError(f"the student takes images of shape {list(model.image_shape)}, the data has "
                                  f"{list(data.image_shape)}", "use 28x28 grey images (mnist or fashion_mnist)")
        if self.alpha == 0.0:
            return  # the student alone: no teacher needed
        device = next(model.parameters()).device
        self.teacher = self.load_or_train_teacher(data, device)

    def teacher_file(self, data: Any) -> Path:
        """Where a teacher with these settings, trained on this data, is cached (or `task.teacher_path`)."""
        if self.teacher_path:
            return Path(self.teacher_path).expanduser()
        key = {"version": TEACHER_VERSION, "dataset": data.dataset, "train_examples": len(data.train),
               "num_classes": data.num_classes, **self.teacher_settings}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / "distillation" / f"teacher-{digest}.safetensors"

    def load_or_train_teacher(self, data: Any, device: torch.device) -> nn.Module:
        from safetensors.torch import load_file, save_file

        settings = self.teacher_settings
        path = self.teacher_file(data)
        if self.teacher_path and not path.is_file():
            raise PapertrainError(f"task.teacher_path={self.teacher_path} does not exist",
                                  "point it at a teacher's safetensors file, or set it to null to train one")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings["seed"])  # the teacher's own random numbers; the student's are restored
            teacher = MLP(settings["hidden"], data.num_classes, dropout=settings["dropout"])
            if path.is_file():
                teacher.load_state_dict(load_file(path))
                print(f"distillation: teacher {teacher.describe()} from {path}", flush=True)
            else:
                print(f"distillation: no cached teacher for these settings; training {teacher.describe()} "
                      f"({settings['steps']} steps of {settings['batch_size']}), then caching it in {path}",
                      flush=True)
                train_teacher(teacher, data, settings, device)
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # atomic: ranks may race here
                save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, str(partial))
                os.replace(partial, path)
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


def train_teacher(teacher: nn.Module, data: Any, settings: dict[str, Any], device: torch.device) -> None:
    """Adam on cross-entropy, `steps` minibatches of jittered images drawn with the teacher's seed."""
    teacher.to(device).train()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=settings["lr"])
    generator = torch.Generator().manual_seed(settings["seed"])
    images, labels = data.train.tensors["image"], data.train.tensors["label"]
    started, report_every = time.perf_counter(), max(1, settings["steps"] // 5)
    for step in range(1, settings["steps"] + 1):
        index = torch.randint(0, len(labels), (settings["batch_size"],), generator=generator)
        batch = jitter(images[index], settings["jitter"], generator)
        loss = F.cross_entropy(teacher(batch.to(device)), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % report_every == 0 or step == settings["steps"]:
            print(f"distillation: teacher step {step}/{settings['steps']}, loss {loss.item():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    teacher.eval()
    with torch.no_grad():
        val_images, val_labels = data.val.tensors["image"], data.val.tensors["label"]
        correct = sum(int((teacher(val_images[i:i + 1000].to(device)).argmax(-1) == val_labels[i:i + 1000].to(device))
                          .sum()) for i in range(0, len(val_labels), 1000))
    print(f"distillation: teacher val accuracy {correct / max(1, len(val_labels)):.4f}", flush=True)
