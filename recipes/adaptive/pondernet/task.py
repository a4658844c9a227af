"""Parity (PonderNet §3.1, after Graves 2016): does a vector hold an odd number of +1 entries?

"Input vectors had 64 elements, of which a random number from 1 to 64 were randomly set to 1 or -1 and
the rest were set to 0. The corresponding target was 1 if there was an odd number of ones and 0 if
there was an even number of ones." We keep the definition and shrink the length (`n_elements`, 16 in
the tiny config) so that it trains on a CPU in a minute. Positions of the nonzero entries are random.

The whole input is shown at every step; the network must *compute* the parity, and a deeper (longer
pondering) computation can count further than one step of the same cell can.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn

from papertrain.config.constraints import NonNegativeFloat, PositiveInt, Range, Seed
from papertrain.data.tensors import TensorExamples
from papertrain.errors import PapertrainError
from papertrain.recipes.adaptive.pondernet.model import halting_step, ponder_loss


class ParityData:
    """Fixed train and validation sets generated from `seed`: x [n, L] in {-1, 0, 1}, y [n] in {0, 1}.

    Each example also carries `n_nonzero` (its difficulty, for the plots) and `u`, the uniform number
    that decides where PonderNet halts on it at evaluation (see `halting_step`)."""

    def __init__(self, n_elements: PositiveInt = 16, n_train: PositiveInt = 100_000, n_val: PositiveInt = 4_000,
                 seed: Seed = 0):
        if n_elements < 1:
            raise PapertrainError(f"data.n_elements={n_elements}: a parity vector needs at least 1 element",
                                  "use e.g. data.n_elements=16 (the paper uses 64)")
        self.n_elements = n_elements
        generator = torch.Generator().manual_seed(seed)
        self.train = self._generate(n_train, generator)
        self.val = self._generate(n_val, generator)

    def _generate(self, n: int, generator: torch.Generator) -> TensorExamples:
        length = self.n_elements
        n_nonzero = torch.randint(1, length + 1, (n,), generator=generator)  # 1 .. L entries are nonzero
        # which positions: the n_nonzero first of a random permutation of each row
        ranks = torch.rand(n, length, generator=generator).argsort(dim=1).argsort(dim=1)
        nonzero = ranks < n_nonzero[:, None]
        signs = torch.randint(0, 2, (n, length), generator=generator) * 2 - 1  # ±1
        x = torch.where(nonzero, signs, 0).float()
        y = ((x == 1).sum(dim=1) % 2).float()  # 1 when the number of +1 entries is odd
        u = torch.rand(n, generator=generator)
        return TensorExamples(x=x, y=y, n_nonzero=n_nonzero, u=u)

    def describe(self) -> str:
        return (f"parity of {self.n_elements}-element vectors with 1-{self.n_elements} entries set to ±1, "
                f"{len(self.train):,} train / {len(self.val):,} val (chance accuracy 0.5)")


class PonderTask:
    """L = Σ p_n BCE(y, ŷ_n) + β KL(p ‖ p_G(λ_p)); evaluation halts by sampling (or at the median of p).

    beta:      β, the weight of the KL to the geometric prior
    lambda_p:  the prior's halting probability per step (its mean is 1/λ_p steps)
    halting:   "sample" (the paper: n ~ p, one fixed uniform per validation example) or "median"
    """

    unit = "samples"

    def __init__(self, beta: NonNegativeFloat = 0.01, lambda_p: Annotated[float, Range(gt=0, le=1)] = 0.2,
                 halting: str = "sample"):
        if halting not in ("sample", "median"):
            raise PapertrainError(f"task.halting={halting!r} is not a halting rule",
                                  "use task.halting=sample (the paper) or task.halting=median")
        if beta < 0:
            raise PapertrainError(f"task.beta={beta} must be >= 0", "use e.g. task.beta=0.01")
        if not 0.0 < lambda_p <= 1.0:
            raise PapertrainError(f"task.lambda_p={lambda_p} is not a probability in (0, 1]",
                                  "use e.g. task.lambda_p=0.2 (the prior's mean is 1/lambda_p steps)")
        self.beta, self.lambda_p, self.halting = beta, lambda_p, halting

    def prepare(self, model: nn.Module, data: ParityData) -> None:
        if model.input_size != data.n_elements:
            raise PapertrainError(f"model.input_size={model.input_size} but the parity vectors have "
                                  f"{data.n_elements} elements", f"set model.input_size={data.n_elements}")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y_hat, log_p = model(batch["x"])
        return ponder_loss(y_hat, log_p, batch["y"], self.beta, self.lambda_p)

    def predict(self, y_hat: torch.Tensor, log_p: torch.Tensor, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted parity [B], halting step [B], 1-based) under this task's halting rule."""
        u = batch["u"] if self.halting == "sample" else 0.5
        step = halting_step(log_p, u)
        chosen = y_hat.gather(1, step[:, None]).squeeze(1)  # ŷ at the halting step
        return (chosen > 0).float(), step + 1

    def evaluate(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        y_hat, log_p = model(batch["x"])
        loss, parts = ponder_loss(y_hat, log_p, batch["y"], self.beta, self.lambda_p)
        predicted, steps = self.predict(y_hat, log_p, batch)
        return {"loss": loss, **parts, "accuracy": (predicted == batch["y"]).float().mean(),
                "halting_step": steps.float().mean()}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["y"])

    def sample(self, model: nn.Module, data: ParityData, generator: torch.Generator) -> dict[str, Any]:
        """Accuracy and pondering by difficulty (number of nonzero entries) on the validation set, and a plot."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in data.val.batch(torch.arange(len(data.val))).items()}
        y_hat, log_p = model(batch["x"])
        predicted, steps = self.predict(y_hat, log_p, batch)
        correct = (predicted == batch["y"]).float().cpu()
        expected = (log_p.exp() * torch.arange(1, log_p.shape[1] + 1, device=device)).sum(1).cpu()
        n_nonzero = batch["n_nonzero"].cpu()
        rows, by_count = ["nonzero entries | examples | accuracy | E[steps] | mean halting step"], []
        for k in range(1, data.n_elements + 1):
            chosen = n_nonzero == k
            if chosen.any():
                by_count.append((k, float(correct[chosen].mean()), float(expected[chosen].mean())))
                rows.append(f"{k:15d} | {int(chosen.sum()):8d} | {by_count[-1][1]:8.3f} | {by_count[-1][2]:8.2f} | "
                            f"{float(steps.cpu()[chosen].float().mean()):.2f}")
        return {"by_difficulty": "\n".join(rows), "difficulty": self._plot(by_count, log_p.exp().mean(0).cpu())}

    @staticmethod
    def _plot(by_count: list[tuple[int, float, float]], mean_p: torch.Tensor) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        counts = [k for k, _, _ in by_count]
        left.plot(counts, [a for _, a, _ in by_count], "o-", color="tab:blue", label="accuracy")
        left.set_xlabel("nonzero entries in the input")
        left.set_ylabel("validation accuracy", color="tab:blue")
        left.set_ylim(0.4, 1.02)
        twin = left.twinx()
        twin.plot(counts, [s for _, _, s in by_count], "s--", color="tab:red")
        twin.set_ylabel("expected steps E[n]", color="tab:red")
        left.set_title("accuracy and pondering by difficulty", fontsize=9)
        right.bar(range(1, len(mean_p) + 1), mean_p.numpy(), color="tab:gray")
        right.set_xlabel("step n")
        right.set_ylabel("mean p_n over validation")
        right.set_title("halting distribution", fontsize=9)
        fig.tight_layout()
        return fig
