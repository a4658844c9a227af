"""CFR as a papertrain task: one engine step is one CFR iteration, evaluation is exploitability.

There is no data and no loss. `train_step` runs iteration t = ctx.step + 1 on the model's tables and
reports the average strategy's value for player 1 and the immediate counterfactual regret (train/ metrics,
averaged by the engine over the iterations between two logged lines). `evaluate_all`, every
`trainer.eval_every` iterations and at the end, measures how far σ̄^T is from an equilibrium:

    exploitability(σ̄) = ( max_{σ'_1} u_1(σ'_1, σ̄_2) + max_{σ'_2} u_2(σ̄_1, σ'_2) ) / 2       (NashConv / 2)

(val/exploitability, the goal in meta.yaml) and u_1(σ̄) (val/game_value, which tends to -1/18).

The task keeps the curve of exploitability against iterations as named state (checkpointed, the same on
every rank), measured in the step at 20 log-spaced iterations per decade and wherever an evaluation
follows, so the sample's log-log plot covers the whole run, from iteration 1, after a resume too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from papertrain.errors import PapertrainError
from papertrain.recipes.games.cfr import kuhn

# iterations at which the curve is measured besides evaluations: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, ...
RECORD_AT = frozenset(round(10 ** (k / 20)) for k in range(0, 20 * 9 + 1))


class CFRTask:
    """Run CFR on Kuhn poker; measure the average strategy's exploitability and value."""

    solver = True  # no optimizer: `optimizer: null`
    unit = "iterations"
    state_scope = "replicated"  # the curve is the same on every rank

    def __init__(self) -> None:
        self.iterations: list[int] = []  # T at each measurement
        self.exploitability: list[float] = []  # exploitability(σ̄^T) there

    def prepare(self, model: nn.Module, data: Any) -> None:
        if not callable(getattr(model, "iterate", None)) or not callable(getattr(model, "average_strategy", None)):
            raise PapertrainError(f"the cfr task runs CFR iterations on its model, and {type(model).__name__} "
                                  "has no iterate(t)/average_strategy()",
                                  "use model._component_: papertrain.recipes.games.cfr.model.CFR")

    # -- one iteration ---------------------------------------------------------------------------------
    def train_step(self, ctx: Any, batch: None) -> dict[str, torch.Tensor]:
        model, t = ctx.raw_model, ctx.step + 1  # ctx.step iterations are done; this is iteration t
        model.iterate(t)
        ctx.units = 1  # what the engine's throughput counts: iterations/s
        average = model.average_strategy()
        every, last = ctx.trainer.eval_every, ctx.trainer.max_steps
        if t in RECORD_AT or t == last or (every and t % every == 0):
            # measured here, not in evaluate_all: the engine may write the last checkpoint before the final
            # evaluation, and state changed there would be missing from it
            self.iterations.append(t)
            self.exploitability.append(float(kuhn.exploitability(average)))
        return {"game_value": kuhn.expected_value(average), "immediate_regret": model.immediate_regret(t)}

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate_all(self, ctx: Any) -> dict[str, float]:
        average = ctx.raw_model.average_strategy()
        return {"exploitability": float(kuhn.exploitability(average)),
                "game_value": float(kuhn.expected_value(average))}

    # -- named state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iterations": list(self.iterations), "exploitability": list(self.exploitability)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iterations = [int(t) for t in state["iterations"]]
        self.exploitability = [float(e) for e in state["exploitability"]]

    # -- samples ---------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, data: Any, generator: torch.Generator) -> dict[str, Any]:
        """The average strategy next to Kuhn's equilibria, and the log-log plot of exploitability."""
        average = model.average_strategy().double().cpu()
        title = f"Kuhn poker: {getattr(model, 'short_name', type(model).__name__)}"
        return {"strategy": strategy_table(average), "convergence": self.plot(title),
                "alpha": float(average[kuhn.info_set_index(0, ""), kuhn.BET])}

    def plot(self, title: str) -> Any:
        curve = {"exploitability of the average strategy σ̄ᵀ": (self.iterations, self.exploitability)}
        return convergence_figure(curve, title)


def convergence_figure(curves: dict[str, tuple[list[int], list[float]]], title: str) -> Any:
    """Exploitability against iterations, log-log, one line per curve, with O(1/√T) and O(1/T) guide lines
    through the first curve's first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    points = [(t, e) for iterations, values in curves.values() for t, e in zip(iterations, values)]
    for index, (label, (iterations, values)) in enumerate(curves.items()):
        axis.loglog(iterations, values, "o-", markersize=2.5, linewidth=1.5, color=f"C{index}", label=label)
    if points:
        first = next(c for c in curves.values() if c[0])
        t0, e0, last = first[0][0], first[1][0], max(t for t, _ in points)
        span = torch.logspace(math.log10(t0), math.log10(last), 50, dtype=torch.float64)
        axis.loglog(span.numpy(), (e0 * (t0 / span) ** 0.5).numpy(), "--", color="0.45", label="O(1/√T)")
        axis.loglog(span.numpy(), (e0 * (t0 / span)).numpy(), ":", color="0.2", linewidth=2, label="O(1/T)")
        axis.axhline(1e-3, color="k", linestyle="-.", linewidth=0.8, alpha=0.5, label="goal 1e-3")
        axis.set_ylim(min(min(e for _, e in points), e0 * t0 / last) / 2, 2 * e0)
    axis.set_xlabel("iteration T")
    axis.set_ylabel("exploitability (NashConv / 2, chips per hand)")
    axis.set_title(f"{title}\nexploitability of the average strategy against iterations", fontsize=10)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return figure


def plot_comparison(compare_dir: Path) -> Path:
    """All variants of a `papertrain compare cfr` run on one log-log plot, from the curve each run keeps in
    its last checkpoint: COMPARE_DIR/convergence.png. (The engine's comparison.png has linear axes.)"""
    from papertrain.checkpoint import weights_only_load

    curves = {}
    for variant in json.loads((compare_dir / "comparison.json").read_text())["variants"]:
        checkpoint = max((compare_dir / variant["folder"] / "checkpoints").glob("step_*"))
        state = weights_only_load(checkpoint / "state" / "task" / "rest.pt", checkpoint)
        curves[variant["variant"]] = (state["iterations"], state["exploitability"])
    figure = convergence_figure(curves, "Kuhn poker: CFR and its variants")
    figure.savefig(compare_dir / "convergence.png", dpi=110)
    return compare_dir / "convergence.png"


# Kuhn (1950): player 2's equilibrium strategy is unique; player 1's is a family with one parameter, the
# probability α ∈ [0, 1/3] of betting the J, and then P(bet) at every other information set follows.
def equilibrium_bet_probability(info_set: str, alpha: float) -> float:
    """P(bet) at `info_set` in the equilibrium where player 1 bets the J with probability alpha."""
    return {"J": alpha, "Q": 0.0, "K": 3 * alpha, "Jpb": 0.0, "Qpb": alpha + 1 / 3, "Kpb": 1.0,
            "Jp": 1 / 3, "Qp": 0.0, "Kp": 1.0, "Jb": 0.0, "Qb": 1 / 3, "Kb": 1.0}[info_set]


def strategy_table(average: torch.Tensor) -> str:
    """The average strategy per information set, beside the equilibrium with the same α."""
    alpha = float(average[kuhn.info_set_index(0, ""), kuhn.BET])
    rows = [f"average strategy (P(bet) = bet or call; alpha = P(player 1 bets the J) = {alpha:.4f})",
            f"value for player 1: {float(kuhn.expected_value(average)):+.6f} "
            f"(game value -1/18 = {kuhn.GAME_VALUE:+.6f})",
            f"exploitability: {float(kuhn.exploitability(average)):.3e}", "",
            "info set | player | history | P(pass) | P(bet) | equilibrium P(bet)"]
    for index in sorted(range(kuhn.N_INFO_SETS), key=lambda i: (kuhn.info_set_player(i), i % 3, i)):
        name = kuhn.INFO_SETS[index]
        history = name[1:] or "(start)"
        rows.append(f"{name:8s} | {kuhn.info_set_player(index) + 1:6d} | {history:7s} | "
                    f"{float(average[index, kuhn.PASS]):7.4f} | {float(average[index, kuhn.BET]):6.4f} | "
                    f"{equilibrium_bet_probability(name, min(alpha, 1 / 3)):.4f}")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m papertrain.recipes.games.cfr.task [runs/cfr-compare]
    import sys

    print(plot_comparison(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cfr-compare")))
