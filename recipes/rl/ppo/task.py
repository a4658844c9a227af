"""PPO as a task that owns its training step: a rollout from the environments (the data source), GAE,
then `epochs` passes of minibatch steps on the clipped objective; evaluation by greedy episodes.

How ranks share the work (so that N ranks compute what one process computes): the source gives each rank
its own environments, and every transition has a global number (step t of environment i: t·num_envs + i).
Each epoch draws one permutation of the global numbers from a generator that is the same on every rank
(`ctx.random`); a minibatch is the next `minibatch_size` of them, and each rank computes the loss of those
it holds, as a sum divided by the minibatch size, times the number of ranks (the reduction averages over
ranks). The gradients then add up to the minibatch's mean on any number of ranks. The advantages are
normalised with the mean and standard deviation of the whole global rollout (one all-reduce).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from papertrain.config.constraints import AnyFloat, NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from papertrain.errors import PapertrainError
from papertrain.metrics import read_metrics
from papertrain.recipes.rl.ppo.model import gae, ppo_loss


class PPOTask:
    unit = "env_steps"

    def __init__(self, gamma: Probability = 0.99, gae_lambda: Probability = 0.95, epochs: PositiveInt = 10,
                 minibatch_size: PositiveInt = 64, clip_range: PositiveFloat = 0.2,
                 clip_decay_steps: PositiveInt | None = None,
                 value_coef: NonNegativeFloat = 0.5, entropy_coef: NonNegativeFloat = 0.0,
                 normalize_advantages: bool = True, eval_episodes: PositiveInt = 100, eval_greedy: bool = True,
                 eval_max_steps: PositiveInt | None = None, solved_return: AnyFloat | None = None):
        self.gamma, self.lam, self.epochs, self.minibatch_size = gamma, gae_lambda, epochs, minibatch_size
        self.clip_range, self.clip_decay_steps = clip_range, clip_decay_steps
        self.value_coef, self.entropy_coef = value_coef, entropy_coef
        self.normalize_advantages = normalize_advantages
        self.eval_episodes, self.eval_greedy, self.eval_max_steps = eval_episodes, eval_greedy, eval_max_steps
        self.solved_return = solved_return

    def prepare(self, model: nn.Module, data: Any) -> None:
        if not callable(getattr(data, "next_batch", None)) or not hasattr(data, "num_actions"):
            raise PapertrainError("PPO learns from environments: data must be a source of rollouts",
                                  "use data._component_: papertrain.data.envs.VectorEnvRollouts")
        if getattr(model, "num_actions", data.num_actions) != data.num_actions:
            raise PapertrainError(f"model.num_actions={model.num_actions}, but {data.env_id} has {data.num_actions} "
                                  "actions", f"set model.num_actions={data.num_actions}")
        rollout = data.steps * data.num_envs
        if rollout % self.minibatch_size:
            raise PapertrainError(f"a rollout of {data.steps} steps x {data.num_envs} environments = {rollout} "
                                  f"transitions does not split into minibatches of {self.minibatch_size}",
                                  f"use a task.minibatch_size that divides {rollout}")

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["rewards"].numel()  # this rank's environment steps

    # -- the step -------------------------------------------------------------------------------------
    def clip_at(self, step: int) -> float:
        """ε, or with `clip_decay_steps` = S decayed linearly to 0 over S steps (SB3's lin_0.2 for CartPole; the
        PPO paper's Atari ε = 0.1 α). S is a setting of its own, like a schedule's length, so that a resumed
        run decays exactly as an uninterrupted one."""
        if self.clip_decay_steps is None:
            return self.clip_range
        return self.clip_range * max(0.0, 1 - (step + 1) / self.clip_decay_steps)

    def train_step(self, ctx: Any, rollout: dict[str, torch.Tensor]) -> dict[str, Any]:
        strategy, data = ctx.strategy, ctx.data
        steps, local_envs = rollout["rewards"].shape
        advantages, returns = gae(rollout["rewards"], rollout["values"], rollout["last_values"], rollout["terminated"],
                                  rollout["truncated"], rollout["final_values"], self.gamma, self.lam)
        flat = {"obs": rollout["obs"].flatten(0, 1), "actions": rollout["actions"].flatten(),
                "log_probs": rollout["log_probs"].flatten(), "advantages": advantages.flatten(),
                "returns": returns.flatten(), "values": rollout["values"].flatten()}
        if self.normalize_advantages:  # over the whole global rollout
            a = flat["advantages"]
            sums = strategy.sum_across_ranks({"n": float(a.numel()), "s": float(a.double().sum()),
                                              "ss": float(a.double().pow(2).sum())})
            mean = sums["s"] / sums["n"]
            std = math.sqrt(max(sums["ss"] / sums["n"] - mean * mean, 0.0) * sums["n"] / max(sums["n"] - 1, 1))
            flat["advantages"] = (a - mean) / (std + 1e-8)
        # global number of each local transition: step t of environment i is t·num_envs + i
        env_index = torch.tensor(data.indices)
        global_ids = (torch.arange(steps)[:, None] * data.num_envs + env_index[None, :]).flatten()
        total = steps * data.num_envs
        position = torch.full((total,), -1, dtype=torch.long)
        position[global_ids] = torch.arange(global_ids.numel())
        clip = self.clip_at(ctx.step)
        scale = strategy.data_world_size / self.minibatch_size  # see the module docstring
        sums: dict[str, float] = {}
        for epoch in range(self.epochs):
            order = torch.randperm(total, generator=ctx.random(f"epoch {epoch}", "cpu"))
            for start in range(0, total, self.minibatch_size):
                chosen = position[order[start:start + self.minibatch_size]]
                mine = chosen[chosen >= 0].to(ctx.device)  # this rank's part of the minibatch (maybe none)
                with ctx.autocast():
                    loss, parts = ppo_loss(ctx.model, flat["obs"][mine], flat["actions"][mine], flat["log_probs"][mine],
                                           flat["advantages"][mine], flat["returns"][mine], clip, self.value_coef,
                                           self.entropy_coef, scale)
                ctx.backward(loss)
                ctx.optimizer_step(advance_schedule=False)
                for key, value in {"loss": loss.detach() / scale, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        ctx.advance_schedule()  # the learning rate decays per rollout
        y, error = flat["returns"].double(), (flat["returns"] - flat["values"]).double()
        totals = strategy.sum_across_ranks({**sums, "y": float(y.sum()), "yy": float(y.pow(2).sum()),
                                            "e": float(error.sum()), "ee": float(error.pow(2).sum())})
        samples = total * self.epochs
        recent = data.recent_mean_return()
        metrics = {key: totals[key] / samples for key in sums}
        variance = totals["yy"] / total - (totals["y"] / total) ** 2
        error_variance = totals["ee"] / total - (totals["e"] / total) ** 2
        metrics["explained_variance"] = 1 - error_variance / max(variance, 1e-12)  # how much of V̂ V explains
        metrics["clip_range"] = clip
        if recent is not None:
            metrics["episode_return"] = recent
        ctx.units = steps * local_envs
        return {key: torch.tensor(float(value)) for key, value in metrics.items()}

    # -- evaluation: whole episodes --------------------------------------------------------------------
    def evaluate_all(self, ctx: Any) -> dict[str, Any]:
        """`eval_episodes` episodes on fresh environments (the same seeds at every evaluation), shared out over
        the ranks; greedy actions, or sampled ones (`eval_greedy: false`: an Atari policy that never presses
        FIRE would never end an episode); at most `eval_max_steps` steps each. Every rank runs the policy the
        same number of times (a sharded model needs it)."""
        from papertrain.data.envs import make_env

        strategy, data, policy = ctx.strategy, ctx.data, ctx.raw_model
        mine = [e for e in range(self.eval_episodes) if e % strategy.data_world_size == strategy.data_rank]
        envs = [make_env(data.env_id, data.preset) for _ in mine]
        observations = [env.reset(seed=data.seed + 1_000_000 + e)[0] for env, e in zip(envs, mine)]
        generators = [torch.Generator().manual_seed(data.seed * 1_000_003 + 1_000_000 + e) for e in mine]
        returns, active, steps = [0.0] * len(envs), [True] * len(envs), 0
        while strategy.any_rank(any(active)):
            obs = torch.as_tensor(np.stack([np.asarray(o) for o in observations]) if envs else
                                  np.zeros((0, *data.observation_shape)), dtype=torch.float32)
            actions = policy.act(obs.to(ctx.device), generators, greedy=self.eval_greedy)["action"].cpu()
            steps += 1
            for k, env in enumerate(envs):
                if active[k]:
                    observations[k], reward, terminated, truncated, _ = env.step(int(actions[k]))
                    returns[k] += float(reward)
                    active[k] = not (terminated or truncated) and (self.eval_max_steps is None
                                                                   or steps < self.eval_max_steps)
        for env in envs:
            env.close()
        results = {"mean_return": (sum(returns), len(returns))}
        if self.solved_return is not None:
            results["solved_fraction"] = (sum(r >= self.solved_return for r in returns), len(returns))
        return results

    def sample(self, model: nn.Module, data: Any, generator: torch.Generator, ctx: Any) -> dict[str, Any]:
        """The learning curve so far: the mean return of recent training episodes and of greedy evaluation
        episodes, against environment steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        events = read_metrics(ctx.run_dir / "metrics.jsonl")  # the run's own record so far
        per_step = data.steps * data.num_envs
        train = [(e["step"] * per_step, e["train/episode_return"]) for e in events if "train/episode_return" in e]
        val = [(e["step"] * per_step, e["val/mean_return"]) for e in events if "val/mean_return" in e]
        figure, axis = plt.subplots(figsize=(7, 4))
        if train:
            axis.plot(*zip(*train), color="tab:blue", label="training episodes (mean of the last 100)")
        if val:
            kind = "greedy" if self.eval_greedy else "sampled"
            axis.plot(*zip(*val), "o-", color="tab:orange", label=f"{kind} evaluation ({self.eval_episodes} episodes)")
        if self.solved_return is not None:
            axis.axhline(self.solved_return, color="gray", linestyle="--", linewidth=1, label="solved")
        axis.set_xlabel("environment steps")
        axis.set_ylabel("episode return")
        axis.set_title(f"PPO on {data.env_id}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        return {"returns": figure}
