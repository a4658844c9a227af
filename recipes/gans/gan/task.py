"""The GAN as a task that owns its training step (Algorithm 1), and how its samples are judged.

**The step.** k updates of the discriminator, each on this step's real images and G's samples of fresh
noise, then one update of the generator on fresh noise. Each update computes its loss on every rank (DDP
all-reduces an optimizer's gradients just before it steps, and every parameter must have one on every
rank). The noise of each update is drawn for the *whole global batch* from `ctx.random(name)` (seeded by
the run's seed, the step and the name, the same on every rank), and each rank keeps its own rows
(`ctx.local`): one process and N ranks see the same z beside the same real images, so they compute the
same losses (up to float rounding; D's dropout masks are each rank's own, so a parity check sets
model.dropout=0).

**The score.** A GAN's losses do not say how good its samples are (they measure G against the current D,
which moves). The paper judged MNIST samples by a Parzen-window log-likelihood, which its authors call
unreliable in high dimensions. Here a classifier of MNIST digits, trained once by the same engine and
cached as an *artifact* (papertrain/artifacts.py), looks at a fixed set of generated digits (the same
noise at every evaluation) and reports:

    inception_score         exp(E_x KL(p(y|x) ‖ p(y))), Salimans et al. 2016's score with this classifier
                            instead of Inception: high when each digit is clearly one class (p(y|x) sharp)
                            and all classes occur (p(y) = E_x p(y|x) flat); 1 for a generator that always
                            draws the same image, 10 at most
    classifier_confidence   E_x max_y p(y|x)
    class_coverage          exp(entropy of the histogram of predicted classes): the effective number of
                            digits drawn (10 for all ten equally often; mode collapse lowers it)
    classifier_accuracy     the classifier's accuracy on the run's validation digits (its own quality)
    real_inception_score    the score of as many real validation digits: the ceiling for this classifier
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from papertrain.artifacts import TrainedModel
from papertrain.config.constraints import PositiveFloat, PositiveInt, Seed
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.recipes.gans.gan.model import (GENERATOR_LOSSES, IMAGE_SHAPE, GeneratorLoss, discriminator_loss,
                                               generator_loss)

CLASSIFIER_NAME = "gan-mnist-classifier-v1"  # change it when the classifier's training changes: a new cache entry


def inception_score(probabilities: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) from the classifier's p(y|x) of N images: [N, K] -> a number in [1, K]."""
    p = probabilities.double()
    marginal = p.mean(0, keepdim=True)  # p(y) = E_x p(y|x): [1, K]
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(-1)  # KL(p(y|x) ‖ p(y)) per image: [N]
    return float(kl.mean().exp())


def class_coverage(probabilities: torch.Tensor) -> float:
    """exp(H(histogram of argmax_y p(y|x))): the effective number of classes the images fall into, [N, K] -> [1, K]."""
    counts = torch.bincount(probabilities.argmax(-1), minlength=probabilities.shape[-1]).double()
    share = counts / counts.sum()
    return float(torch.exp(-torch.special.xlogy(share, share).sum()))


class GANTask:
    """Algorithm 1 with `k` discriminator updates per generator update and the chosen generator loss
    (`non_saturating`, §3, or `minimax`, eq. 1); judged by an MNIST classifier (see the module docstring).

    The classifier: an MLP with `classifier_hidden` ReLU layers, trained with Adam for `classifier_steps`
    steps of `classifier_batch_size` on all 50,000 training digits, evaluated on all 10,000 validation ones.
    """

    unit = "samples"

    def __init__(self, k: PositiveInt = 1, generator_loss: GeneratorLoss = "non_saturating",
                 eval_samples: PositiveInt = 1000, eval_seed: Seed = 0, sample_images: PositiveInt = 64,
                 classifier_hidden: list[PositiveInt] = (256,), classifier_steps: PositiveInt = 1000,
                 classifier_batch_size: PositiveInt = 128, classifier_lr: PositiveFloat = 1e-3,
                 classifier_seed: Seed = 0):
        if generator_loss not in GENERATOR_LOSSES:
            raise PapertrainError(f"task.generator_loss='{generator_loss}' is not a generator loss",
                                  f"use one of: {', '.join(GENERATOR_LOSSES)}")
        if k < 1:
            raise PapertrainError(f"task.k={k}: Algorithm 1 takes at least one discriminator step per generator "
                                  "step", "use task.k=1 (the paper's choice) or more")
        self.k, self.generator_loss = k, generator_loss
        self.eval_samples, self.eval_seed, self.sample_images = eval_samples, eval_seed, sample_images
        self.classifier_settings = {"hidden": [int(n) for n in classifier_hidden], "steps": int(classifier_steps),
                                    "batch_size": int(classifier_batch_size), "lr": float(classifier_lr),
                                    "seed": int(classifier_seed)}
        self.classifier: nn.Module | None = None
        self.reference: dict[str, float] = {}

    # -- the judge: an MNIST classifier, built once -----------------------------------------------------
    def classifier_config(self, run: dict[str, Any]) -> dict[str, Any]:
        """The classifier's run, as a config tree: all of the run's data set (whatever the GAN's subset, so one
        cached classifier serves every GAN run), an MLP, Adam, evaluated on every validation image."""
        settings, data = self.classifier_settings, run.get("data") or {}
        return {
            "name": CLASSIFIER_NAME, "seed": settings["seed"],
            "data": {"_component_": "papertrain.data.images.ImageClassification",
                     "dataset": data.get("dataset", "mnist"), "path": data.get("path")},
            "model": {"_component_": "papertrain.recipes.vision.distillation.model.MLP", "hidden": settings["hidden"],
                      "num_classes": 10, "dropout": 0.0},
            "task": {"_component_": "papertrain.classification.ClassificationTask"},
            "optimizer": {"_component_": "torch.optim.Adam", "lr": settings["lr"]},
            "trainer": {"max_steps": settings["steps"], "batch_size": settings["batch_size"], "precision": "fp32",
                        "eval_batches": 10_000 // settings["batch_size"] + 1, "eval_every": 0, "sample_every": -1,
                        "log_every": max(1, settings["steps"] // 20), "checkpoint_every": 0, "tensorboard": False,
                        "plot": False},  # (no trainer.progress of the run's: it would be part of the cache key)
        }

    def artifacts(self, ctx: Any) -> dict[str, Any]:
        return {"classifier": TrainedModel(self.classifier_config(ctx.config))}

    def use_artifacts(self, built: dict[str, Any]) -> None:
        self.classifier = built.get("classifier")

    def prepare(self, model: nn.Module, data: Any) -> None:
        if tuple(getattr(data, "image_shape", ())) != IMAGE_SHAPE or not hasattr(data, "val"):
            raise PapertrainError("the GAN learns 28x28 grey images: data must be an image data set",
                                  "use data._component_: papertrain.data.images.ImageClassification (mnist)")
        if not hasattr(model, "generator") or not hasattr(model, "discriminator"):
            raise PapertrainError(f"the GAN task trains a model with a generator and a discriminator, got "
                                  f"{type(model).__name__}",
                                  "use model._component_: papertrain.recipes.gans.gan.model.GAN")
        if self.classifier is None:
            raise PapertrainError("the GAN task has no classifier to judge its samples (prepare ran without the "
                                  "artifact stage)", "run it through the trainer")
        device = next(self.classifier.parameters()).device
        images, labels = data.val.tensors["image"], data.val.tensors["label"]
        with torch.no_grad():
            predicted = torch.cat([self.classifier(chunk.to(device)).argmax(-1).cpu() for chunk in images.split(1000)])
            real = self._probabilities(images[:self.eval_samples].to(device))
        self.reference = {"classifier_accuracy": float((predicted == labels).float().mean()),
                          "real_inception_score": inception_score(real)}
        print(f"gan: the scoring classifier has val accuracy {self.reference['classifier_accuracy']:.4f}; "
              f"{len(real)} real validation digits score {self.reference['real_inception_score']:.2f}", flush=True)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["image"])

    # -- the step: Algorithm 1 --------------------------------------------------------------------------
    def noise(self, ctx: Any, name: str, latent_dim: int) -> torch.Tensor:
        """z ~ N(0, I) for the whole global batch from the step's generator `name`; this rank's rows."""
        z = torch.randn(ctx.trainer.batch_size, latent_dim, generator=ctx.random(name, "cpu"))  # [m, latent]
        return ctx.local(z).to(ctx.device)  # [m / ranks, latent]

    def train_step(self, ctx: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):
            raise PapertrainError("the GAN step takes one batch per step", "use trainer.grad_accum_steps=1")
        G, D = ctx.model.generator, ctx.model.discriminator  # ctx.model: sharded under FSDP2
        latent_dim = ctx.raw_model.latent_dim
        x = batch["image"]  # this rank's real images: [b, 1, 28, 28]
        b = len(x)
        sums: dict[str, torch.Tensor] = {}  # over the k updates (tensors: no device sync per update)
        for i in range(self.k):
            # ascend V in D's parameters: -V = -(E log D(x) + E log(1 - D(G(z)))), G held fixed
            z = self.noise(ctx, f"z/discriminator/{i}", latent_dim)  # [b, latent]
            with torch.no_grad(), ctx.autocast():
                fake = G(z)  # [b, 1, 28, 28]
            with ctx.autocast():
                logits = D(torch.cat([x, fake.to(x.dtype)]))  # one pass over real and generated: [2b]
                d_loss = discriminator_loss(logits[:b], logits[b:])
            ctx.backward(d_loss)
            ctx.optimizer_step("discriminator")  # steps D only: its optimizer holds D's parameters
            probabilities = torch.sigmoid(logits.detach().float())
            for key, value in (("d_loss", d_loss.detach()),
                               ("d_real", probabilities[:b].mean()),  # D(x), → 1/2 at the optimum (Theorem 1)
                               ("d_fake", probabilities[b:].mean())):  # D(G(z)), likewise
                sums[key] = sums[key] + value if key in sums else value
        # descend in G's parameters: -log D(G(z)) (§3) or log(1 - D(G(z))) (eq. 1), on fresh noise
        z = self.noise(ctx, "z/generator", latent_dim)
        with ctx.autocast():
            g_loss = generator_loss(D(G(z)), self.generator_loss)
        ctx.backward(g_loss)
        ctx.optimizer_step("generator")  # steps G only (and clears every gradient: the ones g_loss left on D too)
        return {"loss": g_loss.detach(), **{key: total / self.k for key, total in sums.items()}}

    # -- evaluation: the classifier's view of a fixed set of samples -----------------------------------
    def fixed_noise(self, count: int, latent_dim: int) -> torch.Tensor:
        """The same z at every evaluation and sample (its first rows are the same for any count)."""
        return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(self.eval_seed))

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(chunk.float()).float().softmax(-1) for chunk in images.split(500)]).cpu()

    def evaluate_all(self, ctx: Any) -> dict[str, float]:
        """Every rank scores the same `eval_samples` generated digits (a sharded G needs every rank to run it)."""
        generator = ctx.raw_model.generator
        z = self.fixed_noise(self.eval_samples, ctx.raw_model.latent_dim).to(ctx.device)
        images = torch.cat([generator(chunk).float() for chunk in z.split(500)])  # [N, 1, 28, 28]
        p = self._probabilities(images)  # p(y|x): [N, 10]
        return {"inception_score": inception_score(p), "classifier_confidence": float(p.max(-1).values.mean()),
                "class_coverage": class_coverage(p), **self.reference}

    def sample(self, model: nn.Module, data: Any, generator: torch.Generator, ctx: Any) -> dict[str, Any]:
        """`sample_images` digits from the fixed noise (the same z at every evaluation: the grids show
        progress), each pixel drawn 2 x 2 so that the grid is legible, and the curves of D(x), D(G(z)) and
        the score so far."""
        z = self.fixed_noise(self.sample_images, model.latent_dim).to(ctx.device)
        digits = model.generator(z).float().cpu()  # [n, 1, 28, 28] in (0, 1)
        samples: dict[str, Any] = {"digits": digits.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)}
        if ctx.strategy.is_main:
            samples["curves"] = self._curves(ctx)
        return samples

    def _curves(self, ctx: Any) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        events = read_metrics(ctx.run_dir / "metrics.jsonl")  # the run's own record so far

        def series(key: str) -> list[tuple[int, float]]:
            return [(e["step"], e[key]) for e in events if isinstance(e.get(key), (int, float))]

        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label, color in (("train/d_real", "D(x), real digits", "tab:blue"),
                                  ("train/d_fake", "D(G(z)), generated", "tab:red")):
            if series(key):
                left.plot(*zip(*series(key)), color=color, label=label)
        left.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="1/2: the equilibrium p_g = p_data")
        left.set_ylim(0, 1)
        left.set_xlabel("step")
        left.set_title(f"the discriminator's outputs (k = {self.k}, {self.generator_loss.replace('_', '-')} G loss)")
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
        if series("val/inception_score"):
            right.plot(*zip(*series("val/inception_score")), "o-", color="tab:orange", label="generated digits")
        if "real_inception_score" in self.reference:
            right.axhline(self.reference["real_inception_score"], color="gray", linestyle="--", linewidth=1,
                          label="real digits")
        right.set_ylim(1, 10)
        right.set_xlabel("step")
        right.set_title("score by an MNIST classifier")
        right.set_ylabel("exp E KL(p(y|x) ‖ p(y))")
        right.legend(fontsize=8, loc="lower right")
        right.grid(alpha=0.3)
        figure.tight_layout()
        return figure

