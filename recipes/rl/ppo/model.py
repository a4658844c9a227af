"""
# Proximal Policy Optimization with Generalized Advantage Estimation

Schulman, Wolski, Dhariwal, Radford & Klimov (2017), "Proximal Policy Optimization Algorithms", and
Schulman, Moritz, Levine, Jordan & Abbeel (2016), "High-Dimensional Continuous Control Using Generalized
Advantage Estimation".

A policy-gradient method improves π_θ(a|s) by raising the log-probability of actions that turned out
better than expected, weighted by an *advantage* estimate Â_t. Taking many gradient steps on one batch
of experience is what makes it sample-efficient, and also what breaks it: after a few steps π_θ is no
longer the policy that collected the data, and the plain objective rewards moving arbitrarily far.
PPO's answer is to optimise a clipped surrogate (eq. 7 of the PPO paper):

    r_t(θ) = π_θ(a_t|s_t) / π_θ_old(a_t|s_t)                       the probability ratio
    L^CLIP(θ) = Ê_t[ min( r_t(θ) Â_t,  clip(r_t(θ), 1 - ε, 1 + ε) Â_t ) ]

The min takes the pessimistic of the two: once r_t has moved past 1 + ε on an action with Â_t > 0 (or
below 1 - ε with Â_t < 0), the clipped term is the smaller one and is constant in θ, so its gradient is
zero: nothing pushes the policy further from the one that collected the data. (Moving the other way,
where the objective gets *worse*, is never clipped.) With a value function V_φ sharing the batch and an
entropy bonus S for exploration, the loss minimised is (eq. 9, signs as a loss)

    L(θ, φ) = -L^CLIP(θ) + c_1 (V_φ(s_t) - V̂_t)² - c_2 S[π_θ](s_t)

## Generalized Advantage Estimation (GAE, eq. 16 of the 2016 paper)

With the TD residual δ_t = r_t + γ V(s_{t+1}) - V(s_t), the advantage estimate is the exponentially
weighted sum of future residuals,

    Â_t = Σ_{l≥0} (γλ)^l δ_{t+l}            computed backwards:  Â_t = δ_t + γλ Â_{t+1}

λ = 0 is the one-step TD advantage (low variance, biased by V's errors), λ = 1 the Monte-Carlo return
minus V (unbiased, high variance). The value target is V̂_t = Â_t + V(s_t).

**Episode ends, told apart.** When an episode *terminates* (the pole fell), there is no future:
V(s_{t+1}) = 0 and the sum stops. When it is *truncated* by a time limit (CartPole stops at 500 steps
whatever happens), the future exists, it just was not observed: δ_t uses the value of the state it was
cut at, V(s_{t+1}^final), and only then does the sum stop (the next observation belongs to a new episode).
Treating a truncation as a termination teaches V that the 500th step of balancing is worth nothing,
which is wrong and measurably slows learning on time-limited tasks.

The actor and the critic here are separate MLPs with tanh (as in both papers' continuous-control
experiments and SB3's MlpPolicy), orthogonally initialised with small output gains.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from papertrain.config.constraints import PositiveInt, Probability


def gae(rewards: torch.Tensor, values: torch.Tensor, last_values: torch.Tensor, terminated: torch.Tensor,
        truncated: torch.Tensor, final_values: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages Â_t and value targets V̂_t = Â_t + V(s_t) for a rollout of [T, N] (steps x envs).

    terminated[t]: the episode ended at step t (V beyond it is 0); truncated[t]: a time limit cut it, and
    final_values[t] = V(s_{t+1}^final) bootstraps it; last_values [N] = V(s_T) bootstraps the rollout's end.
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_values)  # Â_{t+1}
    for t in reversed(range(steps)):
        ended = (terminated[t] | truncated[t]).to(rewards.dtype)
        # V(s_{t+1}): the next state's value; 0 after a termination; the cut state's after a truncation
        next_value = last_values if t == steps - 1 else values[t + 1]
        next_value = torch.where(truncated[t], final_values[t], next_value * (1 - ended))
        delta = rewards[t] + gamma * next_value - values[t]  # δ_t
        running = delta + gamma * lam * (1 - ended) * running  # Â_t = δ_t + γλ Â_{t+1}, within the episode
        advantages[t] = running
    return advantages, advantages + values


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: min(r Â, clip(r, 1-ε, 1+ε) Â) (eq. 7; maximised), and whether the clip was the one taken."""
    ratio = torch.exp(log_probs - old_log_probs)  # r_t(θ)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    return torch.minimum(unclipped, clipped), (unclipped > clipped)


def orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """π_θ(a|s) and V_φ(s) as two MLPs over a flat observation (CartPole's 4 numbers)."""

    def __init__(self, observation_size: PositiveInt = 4, num_actions: PositiveInt = 2, hidden: PositiveInt = 64,
                 layers: PositiveInt = 2):
        super().__init__()
        self.num_actions = num_actions

        def mlp(out: int, out_gain: float) -> nn.Sequential:
            sizes = [observation_size] + [hidden] * layers
            blocks: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:]):
                blocks += [orthogonal(nn.Linear(a, b), math.sqrt(2)), nn.Tanh()]
            return nn.Sequential(*blocks, orthogonal(nn.Linear(sizes[-1], out), out_gain))

        self.policy = mlp(num_actions, 0.01)  # near-uniform at first
        self.critic = mlp(1, 1.0)

    def init_weights(self, name: str, module: nn.Module) -> None:
        """Orthogonal, as at construction (the engine calls this per module for a meta-device model)."""
        if isinstance(module, nn.Linear):
            last = name.endswith(f".{len(self.policy) - 1}")
            gain = (0.01 if name.startswith("policy") else 1.0) if last else math.sqrt(2)
            orthogonal(module, gain)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B, obs_size] -> (action logits [B, A], values [B])."""
        return self.policy(obs), self.critic(obs).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generators: list[torch.Generator], greedy: bool = False) -> dict[str, torch.Tensor]:
        """Sample a ~ π(·|s) for each row, row k drawing from generators[k] (its environment's own)."""
        logits, values = self(obs)
        log_p = F.log_softmax(logits.float(), dim=-1)
        if greedy:
            actions = log_p.argmax(-1)
        else:
            cumulative = log_p.exp().cumsum(-1).cpu()
            draws = torch.stack([torch.rand((), generator=g) for g in generators])  # u_k ~ U(0, 1)
            actions = torch.searchsorted(cumulative, draws[:, None]).squeeze(-1).clamp(max=self.num_actions - 1)
            actions = actions.to(obs.device)
        return {"action": actions, "log_prob": log_p.gather(-1, actions[:, None]).squeeze(-1), "value": values.float()}


class NatureCNN(ActorCritic):
    """The Atari network of Mnih et al. (2015), shared by actor and critic (PPO's Atari setting): 4 stacked
    84x84 grey frames -> conv 8x8/4 (32), 4x4/2 (64), 3x3/1 (64) -> 512 -> logits and value."""

    def __init__(self, num_actions: PositiveInt = 4, frames: PositiveInt = 4, dropout: Probability = 0.0):
        nn.Module.__init__(self)
        self.num_actions = num_actions
        self.body = nn.Sequential(
            nn.Conv2d(frames, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
            nn.Dropout(dropout))
        self.policy_head = orthogonal(nn.Linear(512, num_actions), 0.01)
        self.value_head = orthogonal(nn.Linear(512, 1), 1.0)

    def init_weights(self, name: str, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            gain = {"policy_head": 0.01, "value_head": 1.0}.get(name, math.sqrt(2))
            nn.init.orthogonal_(module.weight, gain=gain)
            nn.init.zeros_(module.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(obs / 255.0)  # [B, 512]
        return self.policy_head(h), self.value_head(h).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self(obs)[1]


def ppo_loss(model: nn.Module, obs: torch.Tensor, actions: torch.Tensor, old_log_probs: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, clip: float, value_coef: float, entropy_coef: float,
             scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = -L^CLIP + c₁ (V - V̂)² - c₂ S (eq. 9), as SUMS over the given samples times `scale` (1/minibatch
    size on one process: a mean; see the task for how ranks share a minibatch), and diagnostics (sums)."""
    logits, values = model(obs)
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_probs = log_p.gather(-1, actions[:, None]).squeeze(-1)
    surrogate, clipped = clipped_surrogate(log_probs, old_log_probs, advantages, clip)
    entropy = -(log_p.exp() * log_p).sum(-1)  # S[π](s)
    value_error = (values.float() - returns).pow(2)
    loss = (-surrogate + value_coef * value_error - entropy_coef * entropy).sum() * scale
    with torch.no_grad():
        log_ratio = log_probs - old_log_probs
        parts = {"policy_loss": -surrogate.sum(), "value_loss": value_error.sum(), "entropy": entropy.sum(),
                 "approx_kl": ((log_ratio.exp() - 1) - log_ratio).sum(),  # an unbiased, low-variance KL estimate
                 "clip_fraction": clipped.float().sum()}
    return loss, parts

