"""Kuhn poker (Kuhn 1950): the rules, and what a strategy profile is worth.

Three cards, J < Q < K. Each player antes 1 chip and is dealt one card; the third stays hidden. Player 1
acts first. An action is `p` (pass: check, or fold facing a bet) or `b` (bet 1 chip, or call a bet):

    p p      both check: showdown for the antes, the higher card wins 1
    p b p    player 1 checks, player 2 bets, player 1 folds: player 2 wins 1
    p b b    ... player 1 calls: showdown for 2
    b p      player 1 bets, player 2 folds: player 1 wins 1
    b b      player 2 calls: showdown for 2

A player sees their own card and the betting so far, so an *information set* is (card, history): player 1
decides at "" and "pb", player 2 at "p" and "b", three cards each: 12 information sets, 2 actions each.
We name them card + history, "Kpb" = player 1 holding the K after pass-bet (OpenSpiel writes "2pb").

The betting tree is the same for all 6 deals (ordered pairs of distinct cards, each with probability
1/6); only which information set a history belongs to, and who wins a showdown, depend on the deal. So
every quantity below walks the 4 decision histories once, with one entry per deal: `[6]`-vectors.

A strategy (for both players at once, a *profile*) is a table σ[I, a] of shape [12, 2] whose rows sum to 1.
"""

from __future__ import annotations

from functools import lru_cache

import torch

CARDS = "JQK"
ACTIONS = "pb"  # pass (check / fold), bet (bet / call)
PASS, BET = 0, 1
DECISIONS = ("", "p", "b", "pb")  # histories where someone acts, each after its parent
TERMINALS = ("pp", "pbp", "pbb", "bp", "bb")
DEALS = tuple((c1, c2) for c1 in range(3) for c2 in range(3) if c1 != c2)  # (player 1's, player 2's card)
CHANCE = 1.0 / len(DEALS)  # π_c(h): the probability of each deal
GAME_VALUE = -1.0 / 18.0  # Kuhn (1950): player 1's value of the game under any equilibrium

# the 12 information sets, grouped by history: index = 3 * DECISIONS.index(history) + card
INFO_SETS = tuple(card + history for history in DECISIONS for card in CARDS)
N_INFO_SETS, N_ACTIONS = len(INFO_SETS), len(ACTIONS)


def player(history: str) -> int:
    """Who acts after `history`: 0 (player 1) or 1 (player 2); the players alternate."""
    return len(history) % 2


def info_set_index(card: int, history: str) -> int:
    return 3 * DECISIONS.index(history) + card


def info_set_player(index: int) -> int:
    return player(DECISIONS[index // 3])


def utility(history: str, cards: tuple[int, int]) -> float:
    """u_1(z): player 1's winnings at a terminal history (player 2's are the negative: zero sum)."""
    showdown = 1.0 if cards[0] > cards[1] else -1.0
    return {"pp": showdown, "pbp": -1.0, "pbb": 2 * showdown, "bp": 1.0, "bb": 2 * showdown}[history]


def uniform_strategy(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.full((N_INFO_SETS, N_ACTIONS), 1.0 / N_ACTIONS, dtype=dtype, device=device)


class KuhnTree:
    """The game as tensors on one device: for every decision history its information set in each deal,
    for every terminal history player 1's utility in each deal."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        cards = torch.tensor(DEALS, device=self.device)  # [6, 2]
        self.info_set = {h: 3 * k + cards[:, player(h)] for k, h in enumerate(DECISIONS)}  # each [6]
        self.utility = {z: torch.tensor([utility(z, deal) for deal in DEALS], dtype=torch.float64, device=self.device)
                        for z in TERMINALS}  # each [6]
        # which player owns each information set: [12]
        self.owner = torch.tensor([info_set_player(i) for i in range(N_INFO_SETS)], device=self.device)

        # [12, 1] masks: the information sets where one of `players` acts
        self._owned = {players: (self.owner[:, None] == torch.tensor(players, device=self.device)).any(1, keepdim=True)
                       for players in ((0,), (1,), (0, 1))}

    def owned_by(self, players: tuple[int, ...]) -> torch.Tensor:
        """[12, 1]: True on the information sets where one of `players` (0, 1 or both) acts."""
        return self._owned[tuple(players)]

    def policy(self, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        """σ(I(h), ·) in each deal, for every decision history: {history: [6, 2]}."""
        return {h: sigma[self.info_set[h]] for h in DECISIONS}

    def reach(self, policy: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """π_1^σ(h) and π_2^σ(h) for every history: {history: ([6], [6])}. A player's contribution is the
        product of their own action probabilities on the way to h; chance's, 1/6, is kept apart (CHANCE)."""
        ones = torch.ones(len(DEALS), dtype=policy[""].dtype, device=policy[""].device)
        reach = {"": (ones, ones)}
        for h in DECISIONS:  # parents first
            (pi_1, pi_2), s = reach[h], policy[h]
            for a, action in enumerate(ACTIONS):  # only the player who acts changes their reach
                reach[h + action] = (pi_1 * s[:, a], pi_2) if player(h) == 0 else (pi_1, pi_2 * s[:, a])
        return reach

    def action_values(self, values: dict[str, torch.Tensor], history: str) -> torch.Tensor:
        """[6, 2]: the values (of whatever `values` holds, per deal) after each action at `history`."""
        return torch.stack([values[history + action] for action in ACTIONS], dim=1)


@lru_cache(maxsize=8)
def tree(device: str = "cpu") -> KuhnTree:
    return KuhnTree(device)


def expected_value(sigma: torch.Tensor) -> torch.Tensor:
    """u_1(σ) = Σ_z π^σ(z) u_1(z): player 1's expected winnings when both play σ (a 0-d tensor)."""
    game = tree(str(sigma.device))
    policy, values = game.policy(sigma), dict(game.utility)
    for h in reversed(DECISIONS):  # children before parents
        values[h] = (policy[h] * game.action_values(values, h)).sum(1)
    return CHANCE * values[""].sum()


def best_response_value(sigma: torch.Tensor, responder: int) -> torch.Tensor:
    """max over the responder's strategies σ' of u_responder(σ', σ_opponent): what a player wins against
    the opponent's part of σ when they know it. Bottom-up: at each of the responder's information sets,
    take the action whose counterfactual value Σ_{h∈I} π_c π_opp^σ(h) v(h·a) is largest, with the values
    below already those of the best response (perfect recall: no later choice depends on this one)."""
    game = tree(str(sigma.device))
    sign = 1.0 if responder == 0 else -1.0  # zero sum: player 2 wins what player 1 loses
    policy = game.policy(sigma)
    reach = game.reach(policy)
    values = {z: sign * u for z, u in game.utility.items()}  # the responder's utility, [6] per terminal
    for h in reversed(DECISIONS):
        q = game.action_values(values, h)  # [6, 2]
        if player(h) == responder:
            weight = CHANCE * reach[h][1 - responder]  # π_{-i}(h): the opponent's and chance's
            by_info_set = torch.zeros(N_INFO_SETS, N_ACTIONS, dtype=q.dtype, device=q.device)
            by_info_set.index_add_(0, game.info_set[h], weight[:, None] * q)
            best = by_info_set.argmax(dim=1)[game.info_set[h]]  # [6]: the same action in every h ∈ I
            values[h] = q.gather(1, best[:, None]).squeeze(1)
        else:
            values[h] = (policy[h] * q).sum(1)
    return CHANCE * values[""].sum()


def exploitability(sigma: torch.Tensor) -> torch.Tensor:
    """(b_1 + b_2) / 2, each b_i the best-response value against σ_{-i}: NashConv / 2, as OpenSpiel's
    `exploitability` defines it (the game is zero sum, so u_1(σ) + u_2(σ) = 0 drops out). It is 0 exactly
    at a Nash equilibrium, and a profile with exploitability ε is a 2ε-Nash equilibrium."""
    return (best_response_value(sigma, 0) + best_response_value(sigma, 1)) / 2
