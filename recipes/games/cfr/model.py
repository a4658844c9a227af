"""
# Counterfactual regret minimisation (Zinkevich, Johanson, Bowling & Piccione, 2007)

A two-player zero-sum game with hidden information (poker) has a Nash equilibrium: a profile σ = (σ_1, σ_2)
where neither player gains by deviating. It can be found by *self-play with no regret*. A player's average
overall regret after T rounds is how much better the best fixed strategy in hindsight would have done,

    R_i^T = 1/T max_{σ*_i} Σ_{t=1..T} ( u_i(σ*_i, σ^t_{-i}) - u_i(σ^t) ),

and if both players' average regrets are below ε, the *average* strategy σ̄^T is a 2ε-equilibrium
(Theorem 2, the folk theorem). The average of a behavioural strategy is taken over the sequences it plays,
so each iteration counts with the player's own probability of reaching the information set:

    σ̄_i^T(I)(a) = Σ_t π_i^{σ^t}(I) σ^t(I)(a) / Σ_t π_i^{σ^t}(I).

The paper's idea is to minimise regret *locally*, at every information set I, over a quantity that only
needs one tree walk: the counterfactual value of I, in which player i plays to reach I (their own reach is
set to 1) and everyone else, chance included, plays as they do, π_{-i}^σ(h):

    v_i(σ, I) = Σ_{h ∈ I} π_{-i}^σ(h) Σ_{z ∈ Z} π^σ(h, z) u_i(z)         (= π_{-i}^σ(I) u_i(σ, I))

The counterfactual regret of not having played a at I, summed over the iterations, is

    T·R_i^T(I, a) = Σ_t ( v_i(σ^t|_{I→a}, I) - v_i(σ^t, I) )
                  = Σ_t Σ_{h ∈ I} π_{-i}^{σ^t}(h) ( v_i(σ^t, h·a) - v_i(σ^t, h) ),

and Theorem 3 says these local regrets add up to a bound on the global one:
R_i^T ≤ Σ_{I ∈ I_i} R_{i,imm}^{T,+}(I), with R_{i,imm}^{T,+}(I) = max(max_a R_i^T(I, a), 0).
Each information set then runs its own regret minimiser, *regret matching* (Hart & Mas-Colell, 2000):

    σ^{T+1}(I)(a) = R^{T,+}(I, a) / Σ_b R^{T,+}(I, b)    if the denominator is > 0,   1/|A(I)| otherwise.

**Theorem 4.** With regret matching, R_{i,imm}^T(I) ≤ Δ_{u,i} √|A_i| / √T, hence the average overall
regret is R_i^T ≤ Δ_{u,i} |I_i| √|A_i| / √T = O(1/√T), and σ̄^T converges to a Nash equilibrium.
In Kuhn poker Δ_u = 4 (winnings lie in [-2, 2]), |I_i| = 6 and |A_i| = 2, so the exploitability of σ̄^T,
(R_1^T + R_2^T) / 2 for simultaneous updates, is at most 4·6·√2 / √T ≈ 34/√T. In practice CFR on Kuhn
converges faster, near O(1/T).

The paper updates both players at once from the same σ^t (`updates="simultaneous"`, the default).
Variants, all with the same tables:
- `updates="alternating"`: player 1 updates, then player 2 against player 1's *new* strategy (what
  OpenSpiel's `CFRSolver` does; usually faster);
- CFR+ (Tammelin, 2014): `regret_matching="plus"` keeps each cumulative regret at max(R + r, 0), so an
  action that was bad for a while can come back as soon as it is good, and `averaging="linear"` weights
  iteration t by t in σ̄. CFR+ is the three together with alternating updates.

The state is two [12, 2] tables, float64 buffers of this module (checkpointed with it, resumed exactly):
the cumulative regrets T·R^T(I, a) and the cumulative strategy Σ_t w_t π_i^{σ^t}(I) σ^t(I)(a).
The game itself, and best responses to a strategy, are in `kuhn.py`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from papertrain.errors import PapertrainError
from papertrain.recipes.games.cfr import kuhn

Updates = Literal["simultaneous", "alternating"]
RegretMatching = Literal["plain", "plus"]
Averaging = Literal["uniform", "linear"]


def regret_matching(regrets: torch.Tensor) -> torch.Tensor:
    """σ(I)(a) ∝ R^+(I, a), uniform where no regret is positive. regrets: [n_info_sets, n_actions]."""
    positive = regrets.clamp(min=0)
    total = positive.sum(dim=1, keepdim=True)  # [n, 1]
    uniform = torch.full_like(positive, 1.0 / regrets.shape[1])
    return torch.where(total > 0, positive / torch.where(total > 0, total, 1.0), uniform)


def normalise(cumulative_strategy: torch.Tensor) -> torch.Tensor:
    """σ̄(I)(a) = S(I, a) / Σ_b S(I, b): the average strategy, uniform at information sets never reached."""
    total = cumulative_strategy.sum(dim=1, keepdim=True)
    uniform = torch.full_like(cumulative_strategy, 1.0 / cumulative_strategy.shape[1])
    return torch.where(total > 0, cumulative_strategy / torch.where(total > 0, total, 1.0), uniform)


def counterfactual_regrets(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One walk of the tree under σ, for both players: the counterfactual regrets of this iteration
    r(I, a) = Σ_{h∈I} π_{-i}^σ(h) (v_i(σ, h·a) - v_i(σ, h)), [12, 2]; each information set's own reach
    π_i^σ(I), [12]; and u_1(σ), player 1's expected value (a 0-d tensor)."""
    game = kuhn.tree(str(sigma.device))
    policy = game.policy(sigma)  # {h: [6, 2]}: σ(I(h), ·) in each deal
    reach = game.reach(policy)  # {h: (π_1^σ(h), π_2^σ(h))}, each [6]
    values = dict(game.utility)  # v_1(σ, h) per deal: player 1's; player 2's is its negative (zero sum)
    regrets = torch.zeros_like(sigma)
    own_reach = torch.zeros(kuhn.N_INFO_SETS, dtype=sigma.dtype, device=sigma.device)
    for h in reversed(kuhn.DECISIONS):  # children before parents
        i, info_set = kuhn.player(h), game.info_set[h]  # info_set: [6], I(h) in each deal
        q = game.action_values(values, h)  # [6, 2]: v_1(σ, h·a)
        values[h] = (policy[h] * q).sum(dim=1)  # v_1(σ, h) = Σ_a σ(I, a) v_1(σ, h·a)
        # π_{-i}^σ(h), chance's and the opponent's reach, with the sign that makes v_1 into v_i
        weight = (kuhn.CHANCE if i == 0 else -kuhn.CHANCE) * reach[h][1 - i]  # [6]
        # Σ_{h ∈ I}: the two deals that share an information set add into the same row
        regrets.index_add_(0, info_set, weight[:, None] * (q - values[h][:, None]))
        # perfect recall: π_i^σ(h) is the same for every h ∈ I, so either deal's value is I's
        own_reach[info_set] = reach[h][i]
    return regrets, own_reach, kuhn.CHANCE * values[""].sum()


class CFR(nn.Module):
    """Vanilla CFR on Kuhn poker, and its variants; no parameters, two float64 tables as buffers.

    updates:          "simultaneous" (the paper) or "alternating" (player 1, then player 2)
    regret_matching:  "plain" (regret matching, above) or "plus" (CFR+'s regret matching+: regrets floored at 0)
    averaging:        "uniform" (σ̄ weights every iteration by 1, the paper) or "linear" (by t, CFR+)
    """

    def __init__(self, updates: Updates = "simultaneous", regret_matching: RegretMatching = "plain",
                 averaging: Averaging = "uniform"):
        super().__init__()
        for key, value, allowed in (("updates", updates, Updates), ("regret_matching", regret_matching, RegretMatching),
                                    ("averaging", averaging, Averaging)):
            if value not in get_args(allowed):
                raise PapertrainError(f"model.{key}={value!r} is not one of {', '.join(get_args(allowed))}",
                                      f"use e.g. model.{key}={get_args(allowed)[0]}")
        self.updates, self.plus, self.linear = updates, regret_matching == "plus", averaging == "linear"
        self.variant = (updates, regret_matching, averaging)
        shape = (kuhn.N_INFO_SETS, kuhn.N_ACTIONS)
        self.register_buffer("cumulative_regret", torch.zeros(shape, dtype=torch.float64))  # T·R^T(I, a)
        self.register_buffer("cumulative_strategy", torch.zeros(shape, dtype=torch.float64))  # Σ_t w_t π_i σ^t

    def reset_parameters(self) -> None:
        """No regrets and no history: σ^1 is uniform."""
        self.cumulative_regret.zero_()
        self.cumulative_strategy.zero_()

    @property
    def short_name(self) -> str:
        """E.g. "CFR, alternating updates" or "CFR+": what the plot's title says."""
        updates, _, averaging = self.variant
        if self.variant == ("alternating", "plus", "linear"):
            return "CFR+"
        return ", ".join(["CFR", f"{updates} updates"] + ["regret matching+"] * self.plus
                         + [f"{averaging} average"] * self.linear)

    @property
    def display_name(self) -> str:
        """What the engine prints for the model at the start of a run."""
        matching = "regret matching+" if self.plus else "regret matching"
        return (f"{self.short_name} on Kuhn poker ({matching}, {self.variant[2]} average; "
                f"{kuhn.N_INFO_SETS} information sets, tables only)")

    def current_strategy(self) -> torch.Tensor:
        """σ^{T+1}, from the regrets so far: [12, 2]."""
        return regret_matching(self.cumulative_regret)

    def average_strategy(self) -> torch.Tensor:
        """σ̄^T, the strategy that converges to an equilibrium: [12, 2]."""
        return normalise(self.cumulative_strategy)

    def forward(self) -> torch.Tensor:
        return self.average_strategy()

    @torch.no_grad()
    def iterate(self, t: int) -> torch.Tensor:
        """CFR iteration t (1, 2, ...): regrets and average strategy updated in place. Returns u_1(σ^t),
        the value of the profile just played (for alternating updates, the one player 2 faced)."""
        game = kuhn.tree(str(self.cumulative_regret.device))
        weight = float(t) if self.linear else 1.0  # w_t in σ̄
        turns = [(0, 1)] if self.updates == "simultaneous" else [(0,), (1,)]
        for players in turns:
            sigma = self.current_strategy()  # σ^t from R^{t-1} (player 2's turn: player 1's is new)
            regrets, own_reach, value = counterfactual_regrets(sigma)
            updated = game.owned_by(players)  # [12, 1]
            # T·R^T(I, a) += r^t(I, a): only the information sets of the players whose turn it is
            self.cumulative_regret.add_(torch.where(updated, regrets, 0.0))
            if self.plus:  # regret matching+: Q^t = max(Q^{t-1} + r^t, 0)
                self.cumulative_regret.clamp_(min=0)
            # Σ_t w_t π_i^{σ^t}(I) σ^t(I)(a): each player's own reach, so σ̄ averages sequences, not actions
            self.cumulative_strategy.add_(torch.where(updated, weight * own_reach[:, None] * sigma, 0.0))
        return value

    def immediate_regret(self, t: int) -> torch.Tensor:
        """Σ_I R_{imm}^{T,+}(I) over both players' information sets, T = t. For the paper's CFR
        (simultaneous, plain regret matching, uniform average) Theorems 2-3 bound the exploitability of
        σ̄^T by half of it. (Under regret matching+ the floored table is not R, and this is no bound.)"""
        return self.cumulative_regret.max(dim=1).values.clamp(min=0).sum() / t
