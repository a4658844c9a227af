"""PPO + GAE (recipes/rl/ppo): the estimator and the objective against their definitions, the environment
source against the engine's promises (exact resume, the same experience on any number of ranks), and
CartPole learnt to the solved mark."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import RECIPES
from multiprocess import run_ranks
from papertrain.config import load_config
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.recipes.rl.ppo.model import ActorCritic, clipped_surrogate, gae
from papertrain.trainer import Trainer

CONFIG = RECIPES / "rl" / "ppo" / "tiny.yaml"


# -- GAE (Schulman et al. 2016, eq. 16) -------------------------------------------------------------------
def random_rollout(steps: int, envs: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    terminated = torch.rand(steps, envs, generator=g) < 0.1
    truncated = (torch.rand(steps, envs, generator=g) < 0.08) & ~terminated
    return {"rewards": torch.randn(steps, envs, generator=g, dtype=torch.float64),
            "values": torch.randn(steps, envs, generator=g, dtype=torch.float64),
            "last_values": torch.randn(envs, generator=g, dtype=torch.float64),
            "final_values": torch.randn(steps, envs, generator=g, dtype=torch.float64),
            "terminated": terminated, "truncated": truncated}


def advantages_by_definition(r: dict[str, torch.Tensor], gamma: float, lam: float) -> torch.Tensor:
    """Â_t = Σ_l (γλ)^l δ_{t+l}, summed directly, stopping at the end of t's episode (or of the rollout);
    δ_t = r_t + γ V(s_{t+1}) - V(s_t) with V(s_{t+1}) = 0 after a termination, V(s^final) after a truncation."""
    steps, envs = r["rewards"].shape
    out = torch.zeros(steps, envs, dtype=torch.float64)
    for n in range(envs):
        def delta(t: int) -> float:
            if r["terminated"][t, n]:
                next_value = 0.0
            elif r["truncated"][t, n]:
                next_value = float(r["final_values"][t, n])
            else:
                next_value = float(r["last_values"][n] if t == steps - 1 else r["values"][t + 1, n])
            return float(r["rewards"][t, n]) + gamma * next_value - float(r["values"][t, n])

        for t in range(steps):
            total, l = 0.0, 0
            while t + l < steps:
                total += (gamma * lam) ** l * delta(t + l)
                if r["terminated"][t + l, n] or r["truncated"][t + l, n]:
                    break  # the next state belongs to another episode
                l += 1
            out[t, n] = total
    return out


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.98, 0.8), (0.9, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_is_the_discounted_sum_of_td_residuals_within_each_episode(gamma: float, lam: float, seed: int) -> None:
    rollout = random_rollout(24, 5, seed)
    assert rollout["terminated"].any() and rollout["truncated"].any()
    advantages, returns = gae(**rollout, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, advantages_by_definition(rollout, gamma, lam), rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, advantages + rollout["values"])  # V̂_t = Â_t + V(s_t)


def test_a_time_limit_bootstraps_the_value_a_termination_does_not() -> None:
    """One step before the end of an episode, cut (truncated) or ended (terminated): δ = r + γV(cut) - V, or r - V."""
    common = {"rewards": torch.tensor([[1.0]]), "values": torch.tensor([[2.0]]), "last_values": torch.tensor([9.0]),
              "final_values": torch.tensor([[5.0]])}
    cut, _ = gae(**common, terminated=torch.tensor([[False]]), truncated=torch.tensor([[True]]), gamma=0.5, lam=1.0)
    ended, _ = gae(**common, terminated=torch.tensor([[True]]), truncated=torch.tensor([[False]]), gamma=0.5, lam=1.0)
    assert float(cut) == 1.0 + 0.5 * 5.0 - 2.0 and float(ended) == 1.0 - 2.0


# -- the clipped surrogate (eq. 7) ------------------------------------------------------------------------
def test_the_clipped_objective_has_no_gradient_beyond_the_clip_range() -> None:
    """Per sample: past 1 + ε with Â > 0, or below 1 - ε with Â < 0, the clipped term is taken and is flat;
    inside the range, or moving the pessimistic way (past 1 + ε with Â < 0), the gradient is the plain one."""
    eps = 0.2
    g = torch.Generator().manual_seed(3)
    for ratio, advantage, flat in ((1.5, 1.0, True), (0.5, -1.0, True), (1.1, 1.0, False), (0.9, -1.0, False),
                                   (1.5, -1.0, False), (0.5, 1.0, False)):
        old = torch.randn((), generator=g, dtype=torch.float64)
        new = (old + math.log(ratio)).clone().requires_grad_()
        objective, clipped = clipped_surrogate(new, old, torch.tensor(advantage, dtype=torch.float64), eps)
        objective.backward()
        expected = 0.0 if flat else ratio * advantage  # d(r Â)/d log π = r Â
        assert math.isclose(float(new.grad), expected, abs_tol=1e-12), (ratio, advantage, float(new.grad))
        assert bool(clipped) == flat


# -- the environment source -------------------------------------------------------------------------------
def test_each_environment_samples_from_its_own_generator() -> None:
    """An environment's actions do not depend on which other environments share its batch (or rank)."""
    torch.manual_seed(0)
    policy = ActorCritic()
    obs = torch.randn(4, 4)
    together = policy.act(obs, [torch.Generator().manual_seed(s) for s in range(4)])["action"]
    alone = [policy.act(obs[k:k + 1], [torch.Generator().manual_seed(k)])["action"] for k in range(4)]
    assert together.tolist() == torch.cat(alone).tolist()


@pytest.mark.parametrize("env_id, preset", [("CartPole-v1", None), ("ALE/Breakout-v5", "atari")],
                         ids=["cartpole", "breakout"])
def test_an_environments_state_round_trips_exactly(env_id: str, preset: str | None) -> None:
    """Save an environment's state mid-episode; a fresh copy restored from it replays the same future."""
    if preset == "atari":
        pytest.importorskip("ale_py")
    from papertrain.data.envs import env_state, make_env, restore_env_state
    from papertrain.checkpoint import _join_tree, _split_tree

    env = make_env(env_id, preset)
    env.reset(seed=7)
    actions = [int(a) for a in torch.randint(0, int(env.action_space.n), (60,), generator=torch.Generator().manual_seed(1))]
    for a in actions[:20]:
        if any(env.step(a)[2:4]):
            env.reset()
    tensors: dict = {}
    saved = _join_tree(_split_tree(env_state(env), "", tensors), tensors)  # as a checkpoint stores it

    def future(e) -> list:
        out = []
        for a in actions[20:]:
            obs, reward, terminated, truncated, _ = e.step(a)
            out.append((torch.as_tensor(obs).clone(), reward, terminated, truncated))
            if terminated or truncated:
                e.reset()
        return out

    copy = make_env(env_id, preset)
    copy.reset(seed=123)  # somewhere else entirely
    restore_env_state(copy, saved)
    original, restored = future(env), future(copy)
    assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(original, restored))


def test_a_missing_environment_names_what_to_install() -> None:
    from papertrain.data.envs import make_env

    with pytest.raises(PapertrainError, match="did you mean 'CartPole-v1'"):
        make_env("CartPol-v1")


QUICK = ["data.num_envs=4", "data.steps=16", "task.epochs=2", "task.minibatch_size=32", "task.eval_episodes=4",
         "trainer.batch_size=4", "trainer.log_every=1", "trainer.eval_every=0", "trainer.sample_every=-1",
         "trainer.progress=none", "trainer.plot=false", "trainer.tensorboard=false", "scheduler.total_iters=6",
         "task.clip_decay_steps=6"]


def logged(run_dir: Path, key: str) -> list[float]:
    return [e[key] for e in read_metrics(run_dir / "metrics.jsonl") if key in e]


def test_a_resumed_run_continues_bit_for_bit(tmp_path: Path) -> None:
    """6 rollouts straight == 3, a fresh process state, then 3 more: the environments' physics, their random
    generators and the policy's samplers are named state of the checkpoint."""
    Trainer(load_config(CONFIG, [*QUICK, "trainer.max_steps=6"]), tmp_path / "straight").run()
    Trainer(load_config(CONFIG, [*QUICK, "trainer.max_steps=3", "trainer.checkpoint_every=3"]), tmp_path / "resumed").run()
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000003" / "state" / "data").is_dir()
    torch.manual_seed(99)
    Trainer(load_config(CONFIG, [*QUICK, "trainer.max_steps=6"]), tmp_path / "resumed").run()
    for key in ("train/loss", "train/episode_return", "train/approx_kl"):
        assert logged(tmp_path / "straight", key) == logged(tmp_path / "resumed", key), key
    assert len(logged(tmp_path / "straight", "train/loss")) == 6
    # (the first half ended with an evaluation of its own, at step 3; the last ones are of the same policy)
    assert logged(tmp_path / "straight", "val/mean_return")[-1] == logged(tmp_path / "resumed", "val/mean_return")[-1]


def train_rank(run_dir: str, overrides: list[str]) -> None:
    Trainer(load_config(CONFIG, overrides), Path(run_dir)).run()


@pytest.mark.slow
def test_two_ranks_compute_what_one_process_computes(tmp_path: Path) -> None:
    """Each rank steps 2 of the 4 environments and takes its part of each global minibatch: the losses are
    one process's to float rounding (the gradients of a minibatch add up across ranks)."""
    steps = [*QUICK, "trainer.max_steps=4"]
    train_rank(str(tmp_path / "one"), steps)
    run_ranks(2, train_rank, str(tmp_path / "two"), [*steps, "strategy=ddp"])
    one, two = logged(tmp_path / "one", "train/loss"), logged(tmp_path / "two", "train/loss")
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    assert logged(tmp_path / "one", "val/mean_return") == logged(tmp_path / "two", "val/mean_return")


@pytest.mark.slow
def test_the_tiny_config_solves_cartpole(tmp_path: Path) -> None:
    """The tiny config (SB3 RL zoo's CartPole settings) reaches CartPole-v1's solved mark, a mean return of
    475 over 100 greedy episodes, where the untrained policy gets ~10-30; the run stops at the goal."""
    goal = "callbacks.goal={_component_: papertrain.callbacks.StopAtGoal, metric: val/mean_return, at_least: 475}"
    result = Trainer(load_config(CONFIG, [goal, "trainer.eval_every=20", "trainer.progress=none",
                                          "trainer.plot=false", "trainer.sample_every=-1"]), tmp_path).run()
    returns = logged(tmp_path, "val/mean_return")
    print(f"val/mean_return by evaluation: {returns}, stopped at step {result.step}")
    assert returns[-1] >= 475 and result.step < 390
    assert returns[0] < returns[-1]


def test_the_atari_config_builds_and_trains_a_step(tmp_path: Path) -> None:
    """ppo:breakout (for GPUs): the Atari wrappers, the Nature CNN and its evaluation, on CPU, very briefly."""
    pytest.importorskip("ale_py")
    tiny = ["data.num_envs=2", "data.steps=8", "task.minibatch_size=16", "task.epochs=1", "task.eval_episodes=2",
            "task.eval_max_steps=10", "trainer.max_steps=1", "trainer.batch_size=2", "trainer.progress=none",
            "trainer.plot=false", "trainer.tensorboard=false", "trainer.sample_every=-1"]
    result = Trainer(load_config(RECIPES / "rl" / "ppo" / "breakout.yaml", tiny), tmp_path).run()
    assert result.status == "completed" and math.isfinite(logged(tmp_path, "train/loss")[0])
    assert "val/mean_return" in result.metrics
