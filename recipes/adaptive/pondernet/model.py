"""
# PonderNet: learning to ponder (Banino, Balaguer & Blundell, 2021)

A feed-forward network spends the same computation on every input. PonderNet lets a network decide,
per input, how many times to apply its *step function* s (§2):

    ŷ_n, h_{n+1}, λ_n = s(x, h_n),        n = 1, 2, ..., N

At every step the network makes a prediction ŷ_n and says how likely it is to stop now, λ_n ∈ (0, 1),
the probability of halting at step n *given* that it did not halt before. Halting is a Bernoulli
process, so the probability of halting exactly at step n is (eq. 1)

    p_n = λ_n Π_{j<n} (1 - λ_j)

Training runs all N steps and minimises the *expected* loss under that distribution plus a prior on it
(eqs. 2-4):

    L = L_Rec + β L_Reg,     L_Rec = Σ_{n=1}^{N} p_n L(y, ŷ_n),     L_Reg = KL(p ‖ p_G(λ_p))

Every p_n depends on λ_1 .. λ_n, so the gradient reaches every halting decision without REINFORCE (the
gradient of ACT's ponder cost, by contrast, only reaches the last step). p_G(λ_p) is a geometric
distribution, p_G(n) = λ_p (1 - λ_p)^{n-1}: it keeps every p_n away from zero (exploration) and biases
the expected number of steps towards 1/λ_p.

**Finite N.** Training cannot run forever, so we stop at N = `max_steps` and give the last step the
probability that remains, p_N = Π_{j<N} (1 - λ_j) (i.e. λ_N := 1): p sums to 1 exactly. The prior is
truncated at N as well (renormalised over 1..N), so both sides of the KL are distributions over the
same N outcomes. (The paper's alternative, choosing N per batch as the first step whose cumulative
halting probability exceeds 1 - ε, is not implemented: a fixed N keeps every batch the same shape.)

**Evaluation.** At inference PonderNet halts by sampling: at step n it flips a coin with probability
λ_n and stops at the first head, returning ŷ_n. That is the same as drawing n ~ p, which we do by
inverse-CDF sampling: n = the first step with Σ_{j≤n} p_j > u for a uniform u. The data carries one u
per example, so an evaluation gives the same answer on any number of ranks; with u = 0.5 the rule is
the *median* of p, a deterministic alternative (`halting_step`). We run all N steps and pick the
prediction (a batch does not shrink as its examples halt), so evaluation costs N steps; a deployed
PonderNet would stop computing at the halting step.

The step function here is a GRU cell (as in the paper's parity experiment), read out by two linear
layers: ŷ_n from h_{n+1} (a logit, parity is binary) and λ_n = σ(w·h_{n+1} + b).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt
from papertrain.errors import PapertrainError


def halting_distribution(halt_logits: torch.Tensor) -> torch.Tensor:
    """log p_n from the halting logits a_n (λ_n = σ(a_n)): [B, N-1] -> [B, N], in log space.

    log p_n = log λ_n + Σ_{j<n} log(1 - λ_j)  for n < N,      log p_N = Σ_{j<N} log(1 - λ_j)

    Logs keep the tail exact: p_n can underflow to 0 after a few confident steps, log p_n does not.
    (log σ(a) and log(1 - σ(a)) = log σ(-a) are computed without forming σ.)
    """
    log_lambda = F.logsigmoid(halt_logits)  # log λ_n,       n = 1 .. N-1
    log_continue = F.logsigmoid(-halt_logits)  # log (1 - λ_n)
    # Σ_{j<n} log(1 - λ_j): "not halted before step n", for n = 1 .. N (0 for n = 1)
    not_halted = torch.cat([torch.zeros_like(log_continue[:, :1]), log_continue.cumsum(dim=1)], dim=1)
    log_halt_now = torch.cat([log_lambda, torch.zeros_like(log_lambda[:, :1])], dim=1)  # λ_N := 1
    return log_halt_now + not_halted


def geometric_prior(lambda_p: float, n_steps: int, device: torch.device | None = None) -> torch.Tensor:
    """log p_G(n) of the geometric prior truncated at N (renormalised over n = 1 .. N): [N].

    p_G(n) = λ_p (1 - λ_p)^{n-1} / (1 - (1 - λ_p)^N)
    """
    if not 0.0 < lambda_p <= 1.0:
        raise PapertrainError(f"lambda_p={lambda_p} is not a probability in (0, 1]",
                              "use e.g. task.lambda_p=0.2 (the prior's mean is 1/lambda_p steps)")
    n = torch.arange(n_steps, dtype=torch.float64, device=device)  # n - 1 = 0 .. N-1
    if lambda_p == 1.0:  # all mass on the first step
        return torch.where(n == 0, 0.0, -math.inf).float()
    log_prior = math.log(lambda_p) + n * math.log1p(-lambda_p) - math.log1p(-(1 - lambda_p) ** n_steps)
    return log_prior.float()


def kl_to_prior(log_p: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ p_G) = Σ_n p_n (log p_n - log p_G(n)) per example: [B, N], [N] -> [B].

    Steps with p_n = 0 exactly (a fixed-depth network's point mass) contribute 0, as 0 log 0 = 0.
    """
    p = log_p.exp()
    terms = torch.where(log_p > -math.inf, p * (log_p - log_prior), torch.zeros_like(p))
    return terms.sum(dim=1)


def ponder_loss(y_hat: torch.Tensor, log_p: torch.Tensor, target: torch.Tensor, beta: float, lambda_p: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = Σ_n p_n L(y, ŷ_n) + β KL(p ‖ p_G(λ_p)), averaged over the batch (eqs. 2-4).

    y_hat: [B, N] logits of the binary target at each step; log_p: [B, N]; target: [B] in {0, 1}.
    L is the binary cross-entropy. Returns the loss and its parts (batch means, detached).
    """
    n_steps = y_hat.shape[1]
    per_step = F.binary_cross_entropy_with_logits(  # L(y, ŷ_n) for every step: [B, N]
        y_hat.float(), target.float()[:, None].expand(-1, n_steps), reduction="none")
    p = log_p.float().exp()
    reconstruction = (p * per_step).sum(dim=1)  # L_Rec: the loss expected under p
    regulariser = kl_to_prior(log_p.float(), geometric_prior(lambda_p, n_steps, y_hat.device))  # L_Reg
    steps = torch.arange(1, n_steps + 1, device=y_hat.device, dtype=p.dtype)
    parts = {"reconstruction": reconstruction.mean().detach(), "kl": regulariser.mean().detach(),
             "expected_steps": (p * steps).sum(dim=1).mean().detach()}  # E[n] = Σ n p_n
    return (reconstruction + beta * regulariser).mean(), parts


def halting_step(log_p: torch.Tensor, u: torch.Tensor | float) -> torch.Tensor:
    """The step each example halts at, drawn by inverse CDF: the first n with Σ_{j≤n} p_j > u. [B] (0-based).

    With u ~ U(0, 1) per example this samples n ~ p, which is exactly the paper's coin flip with
    probability λ_n at each step; with u = 0.5 it is the median of p (deterministic).
    """
    cdf = log_p.float().exp().cumsum(dim=1)  # [B, N]
    u = torch.as_tensor(u, dtype=cdf.dtype, device=cdf.device).expand(cdf.shape[0])
    crossed = cdf > u[:, None]
    crossed[:, -1] = True  # rounding may leave Σ p a hair below 1; the last step takes what remains
    return crossed.float().argmax(dim=1)  # first True


class PonderNet(nn.Module):
    """A GRU-cell step function applied up to `max_steps` times, predicting and halting at every step.

    `fixed_depth=True` is the baseline: the same GRU cell and output layer run exactly `max_steps` times
    and answer at the last step, i.e. p is a point mass at step N. It has no halting unit, so it has
    `hidden_size + 1` parameters fewer than PonderNet of the same size.
    """

    def __init__(self, input_size: PositiveInt, hidden_size: PositiveInt = 64, max_steps: PositiveInt = 20,
                 fixed_depth: bool = False):
        super().__init__()
        if max_steps < 1 or (max_steps < 2 and not fixed_depth):
            raise PapertrainError(f"model.max_steps={max_steps}: PonderNet needs at least 2 steps to choose from "
                                  "(with 1 step there is no halting decision)",
                                  "set model.max_steps >= 2, or model.fixed_depth=true for a 1-step network")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.max_steps, self.fixed_depth = max_steps, fixed_depth
        self.cell = nn.GRUCell(input_size, hidden_size)  # h_{n+1} = GRU(x, h_n)
        self.output = nn.Linear(hidden_size, 1)  # ŷ_n: the logit of "odd"
        self.halting = None if fixed_depth else nn.Linear(hidden_size, 1)  # λ_n = σ(·)

    @classmethod
    def check_arguments(cls, arguments: dict) -> Iterator[tuple[str, str]]:
        """With one step there is no halting decision: PonderNet needs N >= 2 (the fixed-depth baseline N >= 1)."""
        if arguments["max_steps"] < 2 and not arguments["fixed_depth"]:
            yield "max_steps", (f"max_steps={arguments['max_steps']}: PonderNet needs at least 2 steps to choose "
                                "from; set max_steps >= 2, or fixed_depth=true for a 1-step network")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, input_size] -> (ŷ: [B, N] logits at every step, log p: [B, N] halting distribution)."""
        if x.dim() != 2 or x.shape[1] != self.input_size:
            raise PapertrainError(f"PonderNet expects inputs of shape [batch, {self.input_size}], got "
                                  f"{list(x.shape)}", f"set model.input_size={x.shape[-1]} to match the data")
        h = x.new_zeros(x.shape[0], self.hidden_size)  # h_1 = 0
        predictions, halt_logits = [], []
        for n in range(self.max_steps):
            h = self.cell(x, h)  # the step function s(x, h_n)
            predictions.append(self.output(h).squeeze(-1))
            if self.halting is not None and n < self.max_steps - 1:  # λ_N is 1 by construction
                halt_logits.append(self.halting(h).squeeze(-1))
        y_hat = torch.stack(predictions, dim=1)  # [B, N]
        if self.halting is None:  # fixed depth: p = δ_N, log p = (-∞, ..., -∞, 0)
            log_p = torch.full_like(y_hat, -math.inf)
            log_p[:, -1] = 0.0
            return y_hat, log_p
        return y_hat, halting_distribution(torch.stack(halt_logits, dim=1))
