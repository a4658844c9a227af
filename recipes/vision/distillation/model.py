"""
# Knowledge distillation (Hinton, Vinyals & Dean, 2015)

"Distilling the Knowledge in a Neural Network" trains a small *student* to imitate a big *teacher*.
The teacher's knowledge is not only its top answer but the whole distribution it puts over the wrong
ones: a "2" that looks a little like a "3" and a little like a "7" says something about how digits
relate, and a one-hot label says none of it. Those small probabilities are invisible at the usual
softmax, so the paper raises the *temperature* T of both softmaxes (§2):

    q_i = exp(z_i / T) / Σ_j exp(z_j / T)

A higher T gives a softer distribution over classes; T = 1 is the ordinary softmax. The student is
trained on a weighted average of two objectives: matching the teacher's soft targets at temperature T,
and the usual cross-entropy with the true labels at T = 1:

    L = α · T² · KL(softmax(v/T) ‖ softmax(z/T)) + (1 - α) · CE(y, softmax(z))

with v the teacher's logits and z the student's. (The paper writes the soft term as a cross-entropy
with the soft targets; KL differs from it by the teacher's entropy, a constant for the student, so the
gradients are the same and the loss is 0 when the student matches.)

**Why T².** The gradient of the soft term with respect to a student logit is (§2.1)

    ∂C/∂z_i = (1/T) (q_i - p_i)

with q the student's and p the teacher's softened distributions. At high T, expanding the exponentials,
q_i ≈ (1 + z_i/T) / (N + Σ_j z_j/T), and if the logits have zero mean per example,

    ∂C/∂z_i ≈ (z_i - v_i) / (N T²)

so the soft term's gradients shrink as 1/T². Multiplying it by T² keeps the two terms' relative
contribution roughly unchanged when T changes; in the limit, distillation *is* matching the logits
(Caruana's logit regression) with the loss ½ Σ (z_i - v_i)² / N. The tests check that limit.

**MNIST (§3).** The paper's teacher has two hidden layers of 1,200 ReLUs, regularised with dropout
(67 test errors); a student of 2 x 800 ReLUs trained alone makes 146 errors, but 74 when trained to
match the teacher's soft targets at T = 20. Here both are MLPs of the same kind, smaller and trained far
shorter (see the README), and the student is compared with itself trained alone on the same budget.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Range
from papertrain.errors import PapertrainError

IMAGE_SHAPE = (1, 28, 28)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = α T² KL(softmax(v/T) ‖ softmax(z/T)) + (1 - α) CE(y, z), means over the batch.

    student_logits z, teacher_logits v: [B, K]; labels y: [B]. With α = 0 the teacher is not needed
    (pass None): the student trains alone on the labels. Returns the loss and its two parts (detached).
    """
    if temperature <= 0:
        raise PapertrainError(f"temperature={temperature} must be > 0", "use e.g. task.temperature=20 (the paper's MNIST)")
    if not 0.0 <= alpha <= 1.0:
        raise PapertrainError(f"alpha={alpha} must lie in [0, 1] (the weight of the soft targets)",
                              "use e.g. task.alpha=0.9, or 0 to train the student alone")
    z = student_logits.float()
    hard = F.cross_entropy(z, labels)  # CE(y, softmax(z)): the ordinary objective, at T = 1
    parts = {"hard": hard.detach()}
    if alpha == 0.0:
        return hard, parts
    if teacher_logits is None:
        raise PapertrainError(f"alpha={alpha} distils from a teacher, but no teacher logits were given",
                              "give the teacher's logits, or set alpha=0")
    log_q = F.log_softmax(z / temperature, dim=-1)  # the student's soft distribution (log)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # the teacher's soft targets (log)
    soft = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()  # KL(p ‖ q), per example, then the batch mean
    parts["soft"] = soft.detach()
    return alpha * temperature**2 * soft + (1 - alpha) * hard, parts


class MLP(nn.Module):
    """28 x 28 images -> hidden ReLU layers -> class logits: the kind of network the paper distils on MNIST.

    `dropout` applies to each hidden layer's output (the paper's teacher used dropout; its student none).
    """

    def __init__(self, hidden: list[PositiveInt], num_classes: PositiveInt = 10,
                 dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.image_shape = IMAGE_SHAPE
        sizes = [IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2], *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(sizes[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 1, 28, 28] -> logits [B, num_classes]."""
        if tuple(images.shape[1:]) != self.image_shape:
            raise PapertrainError(f"this MLP takes images of shape {list(self.image_shape)}, got "
                                  f"{list(images.shape[1:])}", "use 28x28 grey images (data.dataset=mnist or "
                                  "fashion_mnist)")
        h = images.flatten(1)  # [B, 784]
        for layer in self.hidden:
            h = self.dropout(F.relu(layer(h)))
        return self.output(h)

    def describe(self) -> str:
        return "MLP " + "-".join(str(n) for n in [784, *[layer.out_features for layer in self.hidden],
                                                  self.num_classes])
