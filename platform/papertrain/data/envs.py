"""Environments as a stateful data source: an agent's experience, with exact resume.

    data:
      _component_: papertrain.data.envs.VectorEnvRollouts
      env_id: CartPole-v1
      num_envs: 8          # over all ranks: each rank steps its share, as trainer.batch_size is global
      steps: 32            # each env's steps per rollout: one training step sees num_envs x steps transitions

`next_batch(ctx)` acts `steps` times in this rank's environments with the policy `ctx.raw_model` (which
must have `act(obs, generators) -> {action, log_prob, value}` and `value(obs)`) and returns the rollout:
obs, actions, log_probs, values, rewards, `terminated` (the episode ended: no value beyond it) and
`truncated` (a time limit cut it: the value of the state it was cut at, `final_values`, still counts),
each [steps, envs]. Telling those apart is what keeps a time-limited task's returns unbiased.

Every environment has a global index: its seed, its action-sampling generator and its episode counters
belong to it, not to the rank that happens to step it, so the same `num_envs` give the same experience
on one process or N ranks. The whole state (each environment's physics and random generator, wrappers'
counters, observations, the samplers, the recent returns) is `state_dict()`: checkpointed as named state
`data`, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import collections
import difflib
from typing import Any

import numpy as np
import torch

from papertrain.config.constraints import PositiveInt, Seed
from papertrain.errors import PapertrainError

RECENT = 100  # episodes in the running mean of returns (SB3's ep_rew_mean uses 100 too)


def make_env(env_id: str, preset: str | None = None) -> Any:
    """gymnasium.make(env_id), with the install command when the package or id is missing."""
    try:
        import gymnasium as gym
    except ImportError:
        raise PapertrainError("environments need gymnasium", "pip install gymnasium (or papertrain[rl])") from None
    if env_id.startswith("ALE/"):
        try:
            import ale_py

            gym.register_envs(ale_py)
        except ImportError:
            raise PapertrainError(f"{env_id} is an Atari game; ale-py (which ships the ROMs) is not installed",
                                  "pip install ale-py opencv-python-headless (or papertrain[rl])") from None
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
        raise PapertrainError(f"no environment '{env_id}' is registered with gymnasium"
                              + (f" (did you mean '{close[0]}'?)" if close else ""),
                              "pip install the package that provides it (ALE/...: pip install ale-py), or fix data.env_id")
    if preset == "atari":
        from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

        env = gym.make(env_id, frameskip=1, repeat_action_probability=0.0)
        env = AtariPreprocessing(env, frame_skip=4, screen_size=84, terminal_on_life_loss=False, grayscale_obs=True)
        return FrameStackObservation(env, 4)
    if preset is not None:
        raise PapertrainError(f"data.preset={preset!r} is not a wrapper preset", "use null or atari")
    return gym.make(env_id)


# -- an environment's state as plain data (tensors, numbers, strings), and back -----------------------------
_PLAIN = (bool, int, float, str, type(None))


def _capture_value(value: Any) -> tuple[bool, Any]:
    if isinstance(value, _PLAIN):
        return True, value
    if isinstance(value, np.ndarray):
        return True, {"ndarray": torch.from_numpy(value.copy()), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return True, {"scalar": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, np.random.Generator):
        return True, {"bit_generator": value.bit_generator.state}
    if isinstance(value, collections.deque):
        items = [_capture_value(v) for v in value]
        if all(ok for ok, _ in items):
            return True, {"deque": [v for _, v in items], "maxlen": value.maxlen}
    if isinstance(value, (list, tuple)):
        items = [_capture_value(v) for v in value]
        if all(ok for ok, _ in items):
            return True, {"list" if isinstance(value, list) else "tuple": [v for _, v in items]}
    return False, None


def _restore_value(saved: Any, current: Any) -> Any:
    if not isinstance(saved, dict):
        return saved
    if "ndarray" in saved:
        return saved["ndarray"].numpy().astype(saved["dtype"], copy=True)
    if "scalar" in saved:
        return np.dtype(saved["dtype"]).type(saved["scalar"])
    if "bit_generator" in saved:
        current.bit_generator.state = saved["bit_generator"]
        return current
    if "deque" in saved:
        return collections.deque([_restore_value(v, None) for v in saved["deque"]], maxlen=saved["maxlen"])
    if "list" in saved:
        return [_restore_value(v, None) for v in saved["list"]]
    if "tuple" in saved:
        return tuple(_restore_value(v, None) for v in saved["tuple"])
    return saved


def env_state(env: Any) -> list[dict[str, Any]]:
    """Each layer of a (wrapped) environment: its attributes that are plain data, and its random generator.
    An Atari game's emulator is saved whole (ALE's serialised state, random state included)."""
    layers = []
    while env is not None:
        captured = {}
        for name, value in vars(env).items():
            if name in ("env", "spec", "metadata", "action_space", "observation_space"):
                continue
            ok, plain = _capture_value(value)
            if ok:
                captured[name] = plain
        ale = getattr(env, "ale", None)
        if ale is not None and "ale" in vars(env):
            captured["_ale_state"] = torch.frombuffer(bytearray(ale.cloneState(include_rng=True).serialize()),
                                                      dtype=torch.uint8)
        layers.append(captured)
        env = getattr(env, "env", None)
    return layers


def restore_env_state(env: Any, layers: list[dict[str, Any]]) -> None:
    for captured in layers:
        for name, saved in captured.items():
            if name == "_ale_state":
                import ale_py

                state = ale_py.ALEState.__new__(ale_py.ALEState)
                state.__setstate__(bytes(saved.numpy().tobytes()))
                env.ale.restoreState(state)
            else:
                setattr(env, name, _restore_value(saved, getattr(env, name, None)))
        env = getattr(env, "env", None)


class VectorEnvRollouts:
    """`num_envs` copies of `env_id`, this rank's share stepped in turn, as a stateful source of rollouts."""

    state_scope = "per_rank"

    def __init__(self, env_id: str = "CartPole-v1", num_envs: PositiveInt = 8, steps: PositiveInt = 32,
                 seed: Seed = 0, preset: str | None = None):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if num_envs % world:
            raise PapertrainError(f"data.num_envs={num_envs} does not split into {world} ranks",
                                  f"use a multiple of {world}")
        self.env_id, self.steps, self.preset, self.seed = env_id, steps, preset, seed
        self.num_envs, self.world = num_envs, world
        self.indices = list(range(rank * num_envs // world, (rank + 1) * num_envs // world))  # global env numbers
        self.envs = [make_env(env_id, preset) for _ in self.indices]
        self.observations = [env.reset(seed=seed + i)[0] for env, i in zip(self.envs, self.indices)]
        # one generator per environment: its actions do not depend on which rank steps it
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in self.indices]
        self.episode_return = [0.0] * len(self.envs)
        self.episode_length = [0] * len(self.envs)
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.episodes = 0
        space = self.envs[0].action_space
        if not hasattr(space, "n"):
            raise PapertrainError(f"{env_id} has a {type(space).__name__} action space; this source acts in "
                                  "discrete ones", "use an environment with discrete actions (CartPole-v1, ALE/...)")
        self.num_actions = int(space.n)
        self.observation_shape = tuple(self.envs[0].observation_space.shape)

    def describe(self) -> str:
        return (f"{self.env_id}: {self.num_envs} environments ({len(self.envs)} on this rank) x {self.steps} steps "
                f"per rollout, observations {list(self.observation_shape)}, {self.num_actions} actions")

    def _tensor(self, observations: list[Any]) -> torch.Tensor:
        return torch.as_tensor(np.stack([np.asarray(o) for o in observations]), dtype=torch.float32)

    @torch.no_grad()
    def next_batch(self, ctx: Any) -> dict[str, torch.Tensor]:
        """One rollout of `steps` steps in this rank's environments, with the policy as it is now."""
        if ctx.strategy.data_world_size != self.world:
            raise PapertrainError(f"this source was built for {self.world} rank(s) and runs on "
                                  f"{ctx.strategy.data_world_size}", "build the data after connecting the ranks")
        policy, device = ctx.raw_model, ctx.device
        was_training = policy.training
        policy.eval()
        columns: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        finished: list[float] = []
        for _ in range(self.steps):
            obs = self._tensor(self.observations)
            acted = policy.act(obs.to(device), self.generators)
            actions = acted["action"].cpu()
            rewards, terminated, truncated, last_observations = [], [], [], []
            for k, env in enumerate(self.envs):
                observation, reward, term, trunc, _ = env.step(int(actions[k]))
                self.episode_return[k] += float(reward)
                self.episode_length[k] += 1
                last_observations.append(observation)  # the state the step reached (before any reset)
                if term or trunc:
                    finished.append(self.episode_return[k])
                    self.recent_returns.append(self.episode_return[k])
                    self.episodes += 1
                    self.episode_return[k], self.episode_length[k] = 0.0, 0
                    observation, _ = env.reset()
                self.observations[k] = observation
                rewards.append(float(reward))
                terminated.append(bool(term))
                truncated.append(bool(trunc and not term))
            # V of the state a time limit cut an episode at (GAE bootstraps it); one call per step on every
            # rank, truncated or not, so that a sharded policy runs the same collectives everywhere
            cut_values = policy.value(self._tensor(last_observations).to(device)).cpu().float()
            final_values = torch.where(torch.tensor(truncated), cut_values, torch.zeros_like(cut_values))
            columns["obs"].append(obs)
            columns["actions"].append(actions)
            columns["log_probs"].append(acted["log_prob"].cpu().float())
            columns["values"].append(acted["value"].cpu().float())
            columns["rewards"].append(torch.tensor(rewards))
            columns["terminated"].append(torch.tensor(terminated))
            columns["truncated"].append(torch.tensor(truncated))
            columns["final_values"].append(final_values)
        last_values = policy.value(self._tensor(self.observations).to(device)).cpu().float()
        policy.train(was_training)
        batch = {name: torch.stack(values) for name, values in columns.items()}  # [T, envs, ...]
        batch["last_values"] = last_values  # V(s_T): bootstraps the rollout's unfinished episodes
        batch["finished_returns"] = torch.tensor(finished, dtype=torch.float32)
        return batch

    def recent_mean_return(self) -> float | None:
        return float(np.mean(self.recent_returns)) if self.recent_returns else None

    # -- named state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"envs": [env_state(env) for env in self.envs],
                "observations": [_capture_value(np.asarray(o))[1] for o in self.observations],
                "generators": [g.get_state() for g in self.generators],
                "episode_return": list(self.episode_return), "episode_length": list(self.episode_length),
                "recent_returns": list(self.recent_returns), "episodes": self.episodes, "indices": self.indices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["indices"]) != self.indices:
            raise PapertrainError(f"the checkpoint's environments are {state['indices']}, this rank steps "
                                  f"{self.indices}", "resume with the same data.num_envs and number of ranks")
        for env, layers in zip(self.envs, state["envs"]):
            restore_env_state(env, layers)
        self.observations = [_restore_value(o, None) for o in state["observations"]]
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(saved)
        self.episode_return = list(state["episode_return"])
        self.episode_length = list(state["episode_length"])
        self.recent_returns = collections.deque(state["recent_returns"], maxlen=RECENT)
        self.episodes = state["episodes"]
