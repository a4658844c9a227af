"""CFR on Kuhn poker: the game, best responses and CFR itself equal OpenSpiel's for the same strategies;
regret matching follows its definition; the exploitability of the average strategy stays under the paper's
bounds and falls like O(1/√T) or better; the game's value tends to -1/18 and the average strategy to Kuhn's
equilibria; the tiny config gets there through the engine, resumes exactly, and runs only where a solver can."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import RECIPES
from papertrain.config import load_config
from papertrain.metrics import read_metrics
from papertrain.recipes.games.cfr import kuhn
from papertrain.recipes.games.cfr.model import CFR, counterfactual_regrets, regret_matching
from papertrain.recipes.games.cfr.task import RECORD_AT, CFRTask, equilibrium_bet_probability, plot_comparison
from papertrain.trainer import Trainer

pyspiel = pytest.importorskip("pyspiel")
from open_spiel.python import policy as policy_lib  # noqa: E402
from open_spiel.python.algorithms import cfr as open_spiel_cfr  # noqa: E402
from open_spiel.python.algorithms import exploitability as open_spiel_exploitability  # noqa: E402
from open_spiel.python.algorithms import expected_game_score  # noqa: E402

CONFIG = RECIPES / "games" / "cfr" / "tiny.yaml"
QUIET = ["trainer.progress=none", "trainer.plot=false", "trainer.tensorboard=false"]
GAME = pyspiel.load_game("kuhn_poker")


# -- between our information sets ("Kpb") and OpenSpiel's information-state strings ("2pb") -------------
def open_spiel_key(info_set: str) -> str:
    return str(kuhn.CARDS.index(info_set[0])) + info_set[1:]


def to_open_spiel(sigma: torch.Tensor) -> policy_lib.TabularPolicy:
    policy = policy_lib.TabularPolicy(GAME)
    for index, name in enumerate(kuhn.INFO_SETS):
        policy.action_probability_array[policy.state_lookup[open_spiel_key(name)]] = sigma[index].numpy()
    return policy


def from_open_spiel(policy: policy_lib.TabularPolicy) -> torch.Tensor:
    rows = [policy.state_lookup[open_spiel_key(name)] for name in kuhn.INFO_SETS]
    return torch.tensor(policy.action_probability_array[rows], dtype=torch.float64)


def random_strategy(seed: int) -> torch.Tensor:
    """A random behaviour strategy for both players, [12, 2]; about a quarter of the rows pure (0 or 1),
    so that unreached subtrees and ties in the best response are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    p_bet = torch.rand(kuhn.N_INFO_SETS, generator=generator, dtype=torch.float64)
    pure = torch.rand(kuhn.N_INFO_SETS, generator=generator) < 0.25
    p_bet = torch.where(pure, p_bet.round(), p_bet)
    return torch.stack([1 - p_bet, p_bet], dim=1)


def open_spiel_tree() -> list[tuple[tuple[int, int], str, object]]:
    """Every state of OpenSpiel's Kuhn poker after the deal: (cards, our betting history, state)."""
    found = []
    root = GAME.new_initial_state()
    for c1, _ in root.chance_outcomes():
        first = root.child(c1)
        for c2, _ in first.chance_outcomes():
            stack = [(first.child(c2), "")]
            while stack:
                state, history = stack.pop()
                found.append(((c1, c2), history, state))
                if not state.is_terminal():
                    stack += [(state.child(a), history + kuhn.ACTIONS[a]) for a in state.legal_actions()]
    return found


# -- the game --------------------------------------------------------------------------------------------
def test_kuhn_poker_has_12_information_sets_and_the_rules_of_open_spiels() -> None:
    """The same deals (6, each 1/6), histories, players, information sets, actions and payoffs."""
    states = open_spiel_tree()
    assert sorted({cards for cards, _, _ in states}) == sorted(kuhn.DEALS)
    seen = set()
    for cards, history, state in states:
        if state.is_terminal():
            assert history in kuhn.TERMINALS
            assert state.returns() == [kuhn.utility(history, cards), -kuhn.utility(history, cards)]
            continue
        assert history in kuhn.DECISIONS and state.current_player() == kuhn.player(history)
        assert [state.action_to_string(a)[0].lower() for a in state.legal_actions()] == list(kuhn.ACTIONS)
        name = kuhn.INFO_SETS[kuhn.info_set_index(cards[kuhn.player(history)], history)]
        assert state.information_state_string() == open_spiel_key(name)
        seen.add(name)
    assert seen == set(kuhn.INFO_SETS) and len(seen) == 12 and kuhn.N_ACTIONS == 2


@pytest.mark.parametrize("seed", range(5))
def test_exploitability_and_best_responses_equal_open_spiels_for_random_strategies(seed: int) -> None:
    sigma = random_strategy(seed)
    policy = to_open_spiel(sigma)
    ours = float(kuhn.exploitability(sigma))
    assert abs(ours - open_spiel_exploitability.exploitability(GAME, policy)) < 1e-12
    on_policy = expected_game_score.policy_value(GAME.new_initial_state(), [policy, policy])
    assert abs(float(kuhn.expected_value(sigma)) - on_policy[0]) < 1e-12
    improvements = open_spiel_exploitability.nash_conv(GAME, policy, return_only_nash_conv=False).player_improvements
    for responder in (0, 1):  # each player's best-response value: their improvement plus what σ gets them
        best = float(kuhn.best_response_value(sigma, responder))
        assert abs(best - (improvements[responder] + on_policy[responder])) < 1e-12


# -- regret matching -------------------------------------------------------------------------------------
def test_regret_matching_is_uniform_where_no_regret_is_positive() -> None:
    generator = torch.Generator().manual_seed(1)
    regrets = -torch.rand(50, 3, generator=generator, dtype=torch.float64) * 10
    regrets[::5, 0] = 0.0  # zero is not positive either
    assert torch.equal(regret_matching(regrets), torch.full((50, 3), 1 / 3, dtype=torch.float64))


def test_regret_matching_plays_in_proportion_to_positive_regret() -> None:
    generator = torch.Generator().manual_seed(2)
    regrets = torch.randn(200, 4, generator=generator, dtype=torch.float64) * 5
    regrets[0] = torch.tensor([3.0, -1.0, 0.0, 1.0], dtype=torch.float64)
    regrets[1] = torch.tensor([-3.0, -1.0, -2.0, -5.0], dtype=torch.float64)
    sigma = regret_matching(regrets)
    expected = []
    for row in regrets.tolist():  # the definition, row by row in Python floats
        positive = [max(r, 0.0) for r in row]
        expected.append([p / sum(positive) for p in positive] if sum(positive) > 0 else [0.25] * 4)
    torch.testing.assert_close(sigma, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(sigma[0], torch.tensor([0.75, 0.0, 0.0, 0.25], dtype=torch.float64))
    assert torch.equal(sigma[1], torch.full((4,), 0.25, dtype=torch.float64))


def test_counterfactual_regrets_are_action_values_minus_the_strategys_value_weighted_by_opponent_reach() -> None:
    """r(I, a) at the root, by hand: player 1 holding the K, against a uniform player 2."""
    regrets, own_reach, value = counterfactual_regrets(kuhn.uniform_strategy())
    # player 2 holds J or Q (1/6 each). Bet: fold 1/2 (+1) or call 1/2 (+2) -> 1.5; pass: 1/2 check (+1),
    # 1/2 bet, then player 1 bets or passes 1/2 each (+2 / -1) -> 0.5 + 0.25 = 0.75; v = (1.5 + 0.75) / 2
    v_bet, v_pass = 1.5, 0.75
    v = (v_bet + v_pass) / 2
    expected = 2 * (1 / 6) * torch.tensor([v_pass - v, v_bet - v], dtype=torch.float64)
    torch.testing.assert_close(regrets[kuhn.INFO_SETS.index("K")], expected, rtol=0, atol=1e-15)
    assert float(own_reach[kuhn.INFO_SETS.index("Kpb")]) == 0.5  # player 1 passed with probability 1/2
    assert abs(float(value) - float(kuhn.expected_value(kuhn.uniform_strategy()))) < 1e-15


# -- CFR against OpenSpiel's solver ----------------------------------------------------------------------
SOLVERS = {  # our model's settings -> OpenSpiel's solver doing the same
    "simultaneous": ({"updates": "simultaneous"},  # the paper's (OpenSpiel's CFRSolver alternates; its base does not)
                     lambda: open_spiel_cfr._CFRSolver(GAME, alternating_updates=False, linear_averaging=False,
                                                       regret_matching_plus=False)),
    "alternating": ({"updates": "alternating"}, lambda: open_spiel_cfr.CFRSolver(GAME)),
    "cfr+": ({"updates": "alternating", "regret_matching": "plus", "averaging": "linear"},
             lambda: open_spiel_cfr.CFRPlusSolver(GAME)),
}


@pytest.mark.parametrize("variant", list(SOLVERS))
def test_cfr_iterations_equal_open_spiels_solver(variant: str) -> None:
    settings, make_solver = SOLVERS[variant]
    model, solver = CFR(**settings), make_solver()
    for t in range(1, 151):
        model.iterate(t)
        solver.evaluate_and_update_policy()
        if t in (1, 2, 10, 150):
            average = solver.average_policy()
            torch.testing.assert_close(model.average_strategy(), from_open_spiel(average), rtol=0, atol=1e-12)
            torch.testing.assert_close(model.current_strategy(), from_open_spiel(solver.current_policy()),
                                       rtol=0, atol=1e-12)
            exploitability = open_spiel_exploitability.exploitability(GAME, average)
            assert abs(float(kuhn.exploitability(model.average_strategy())) - exploitability) < 1e-12
    nodes = solver._info_state_nodes  # the cumulative regrets themselves (OpenSpiel's are per information state)
    theirs = torch.tensor([[nodes[open_spiel_key(n)].cumulative_regret[a] for a in range(2)] for n in kuhn.INFO_SETS],
                          dtype=torch.float64)
    torch.testing.assert_close(model.cumulative_regret, theirs, rtol=1e-12, atol=1e-12)


# -- what the paper proves -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vanilla_curve() -> dict[int, tuple[float, float]]:
    """The paper's CFR (simultaneous updates): T -> (exploitability of σ̄^T, ½ Σ_I R_imm^{T,+}(I)), at
    T = 1 .. 20 and then 20 log-spaced T per decade up to 1,000."""
    model, curve = CFR(updates="simultaneous"), {}
    for t in range(1, 1001):
        model.iterate(t)
        if t <= 20 or t in RECORD_AT:
            curve[t] = (float(kuhn.exploitability(model.average_strategy())), float(model.immediate_regret(t)) / 2)
    return curve


def test_exploitability_is_bounded_by_the_immediate_counterfactual_regrets_and_theorem_4(vanilla_curve) -> None:
    """Theorems 2 and 3: (R_1 + R_2) / 2 ≤ ½ Σ_I R_imm^{T,+}(I); Theorem 4: ≤ Δ_u |I_i| √|A_i| / √T."""
    for t, (exploitability, half_immediate_regret) in vanilla_curve.items():
        assert exploitability <= half_immediate_regret + 1e-12, t
        assert half_immediate_regret <= 4 * 6 * math.sqrt(2) / math.sqrt(t), t


def test_exploitability_falls_like_one_over_sqrt_t_or_faster(vanilla_curve) -> None:
    """The least-squares slope of log exploitability against log T, T = 10 .. 1,000, is -0.5 or steeper."""
    points = [(t, e) for t, (e, _) in vanilla_curve.items() if t >= 10]
    t = torch.tensor([t for t, _ in points], dtype=torch.float64).log()
    e = torch.tensor([e for _, e in points], dtype=torch.float64).log()
    x, y = t - t.mean(), e - e.mean()
    slope = float((x * y).sum() / (x * x).sum())
    print(f"log-log slope {slope:.3f}; exploitability {vanilla_curve[10][0]:.4f} at T=10, "
          f"{vanilla_curve[1000][0]:.2e} at T=1000")
    assert slope <= -0.5 and vanilla_curve[1000][0] < vanilla_curve[10][0] / math.sqrt(100)


# -- through the engine: the tiny config -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("cfr-tiny")
    result = Trainer(load_config(CONFIG, QUIET), run_dir).run()
    assert result.status == "completed" and result.step == 2000
    return run_dir, result.metrics


def final_tables(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = max((run_dir / "checkpoints").glob("step_*"))
    tables = {}
    for file in (folder / "model").glob("*.safetensors"):
        tables.update(load_file(str(file)))
    return tables


def test_the_tiny_config_reaches_exploitability_below_1e_3_where_uniform_play_is_far_above(tiny_run) -> None:
    run_dir, metrics = tiny_run
    uniform = float(kuhn.exploitability(kuhn.uniform_strategy()))
    print(f"exploitability {metrics['val/exploitability']:.2e} after 2,000 iterations (uniform: {uniform:.4f})")
    assert metrics["val/exploitability"] < 1e-3 < 0.1 < uniform
    events = read_metrics(run_dir / "metrics.jsonl")
    evaluations = [e["val/exploitability"] for e in events if "val/exploitability" in e]
    # step 0 (no iteration yet: uniform play), then every 200 iterations
    assert len(evaluations) == 11 and evaluations[0] == pytest.approx(uniform) and evaluations[-1] < evaluations[1]


def test_the_value_of_the_game_for_player_1_tends_to_minus_one_eighteenth(tiny_run) -> None:
    """|u_1(σ̄) - v*| ≤ NashConv = 2·exploitability, for any profile: both lie between -b_2 and b_1."""
    _, metrics = tiny_run
    gap = abs(metrics["val/game_value"] - kuhn.GAME_VALUE)
    assert gap <= 2 * metrics["val/exploitability"] + 1e-12 and gap < 1e-3
    assert abs(float(kuhn.expected_value(kuhn.uniform_strategy())) - kuhn.GAME_VALUE) > 0.1  # uniform: +1/8


def test_the_average_strategy_approaches_kuhns_family_of_equilibria(tiny_run) -> None:
    """Player 2's equilibrium is unique; player 1's follows from α = P(bet the J) ∈ [0, 1/3] (Kuhn 1950)."""
    run_dir, _ = tiny_run
    tables = final_tables(run_dir)
    average = CFR()
    average.load_state_dict(tables)
    sigma = average.average_strategy()
    alpha = float(sigma[kuhn.INFO_SETS.index("J"), kuhn.BET])
    assert -1e-9 <= alpha <= 1 / 3 + 0.01
    for index, name in enumerate(kuhn.INFO_SETS):
        assert abs(float(sigma[index, kuhn.BET]) - equilibrium_bet_probability(name, alpha)) < 0.03, name


def test_the_sample_is_the_strategy_table_and_a_log_log_plot_of_the_run(tiny_run) -> None:
    run_dir, _ = tiny_run
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == ["step_00002000.txt", "step_00002000_convergence.png"]
    text = (run_dir / "samples" / "step_00002000.txt").read_text()
    assert all(f"\n{name:8s} |" in text for name in kuhn.INFO_SETS) and "-1/18" in text
    task = CFRTask()
    task.load_state_dict(json.loads(json.dumps({"iterations": [1, 10, 100], "exploitability": [0.4, 0.05, 0.006]})))
    figure = task.plot("CFR")
    axis = figure.axes[0]
    labels = [line.get_label() for line in axis.get_lines()]
    assert axis.get_xscale() == axis.get_yscale() == "log" and axis.get_xlabel() and axis.get_ylabel()
    assert "O(1/√T)" in labels and "O(1/T)" in labels and axis.get_legend() is not None


# -- the engine contract ---------------------------------------------------------------------------------
def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock."""
    return [{k: v for k, v in e.items() if k != "time" and not k.startswith(("throughput/", "memory/"))}
            for e in read_metrics(run_dir / "metrics.jsonl")]


def test_an_interrupted_run_resumes_bit_identically(tmp_path: Path) -> None:
    """60 iterations straight, or 30, a fresh Trainer, and 30 more: the same tables, curve and metrics."""
    common = [*QUIET, "trainer.eval_every=10", "trainer.log_every=5", "trainer.checkpoint_every=30",
              "trainer.sample_every=-1", "model.regret_matching=plus", "model.averaging=linear"]
    straight = Trainer(load_config(CONFIG, [*common, "trainer.max_steps=60"]), tmp_path / "straight")
    straight.run()
    Trainer(load_config(CONFIG, [*common, "trainer.max_steps=30"]), tmp_path / "resumed").run()
    resumed = Trainer(load_config(CONFIG, [*common, "trainer.max_steps=60"]), tmp_path / "resumed")
    resumed.run()
    a, b = final_tables(tmp_path / "straight"), final_tables(tmp_path / "resumed")
    assert a.keys() == {"cumulative_regret", "cumulative_strategy"}
    assert all(a[k].dtype == torch.float64 and torch.equal(a[k], b[k]) for k in a)
    assert straight.task.state_dict() == resumed.task.state_dict() and resumed.task.iterations[0] == 1
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")
    # the curves kept in the checkpoints are what `plot_comparison` overlays after `papertrain compare cfr`
    variants = [{"variant": name, "folder": name} for name in ("straight", "resumed")]
    (tmp_path / "comparison.json").write_text(json.dumps({"variants": variants}))
    assert plot_comparison(tmp_path).is_file()


def test_validate_refuses_strategies_that_cannot_run_a_solver(capsys: pytest.CaptureFixture[str]) -> None:
    from papertrain.cli import main

    assert main(["validate", "cfr"]) == 0
    capsys.readouterr()
    assert main(["validate", "cfr", "strategy=ddp"]) == 2
    message = capsys.readouterr()
    text = message.out + message.err
    assert "strategy=ddp" in text and "optimizer: null" in text and "single" in text


def test_bad_settings_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from papertrain.cli import main
    from papertrain.errors import PapertrainError

    assert main(["validate", "cfr", "model.updates=sometimes"]) == 2
    message = capsys.readouterr()
    assert "model.updates" in message.out + message.err
    with pytest.raises(PapertrainError, match="model.averaging='cubic'"):
        CFR(averaging="cubic")
    with pytest.raises(PapertrainError, match="iterate"):
        CFRTask().prepare(torch.nn.Linear(2, 2), None)
