"""The arithmetic of PPO on token sequences: masks, KL estimators, whitening, GAE, the KL controller.

Pure tensor functions, tested against hand-computed examples; the engine only wires them together.
Shapes: (batch, response_length); `mask` is 1 on the response's real tokens (up to and including EOS)
and 0 on the padding after it.
"""

from __future__ import annotations

import math

import torch

INVALID_LOGPROB = 1.0  # written where the mask is 0, so a stray use shows up instead of passing as plausible


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_count(mask: torch.Tensor) -> torch.Tensor:
    """The denominator of `masked_mean` over a whole batch, for `masked_share` of its parts."""
    return mask.to(torch.float32).sum().clamp(min=1)


def masked_share(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A part's share of the masked mean over a batch of `count` tokens: the shares of a batch's parts add up
    to its `masked_mean` (for the whole batch, the very same operations)."""
    return (values * mask.to(values.dtype)).sum() / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    centered = (values - mean) ** 2
    variance = masked_mean(centered, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance over the masked entries; keep the mean when `shift_mean` is False.

    Whitening rewards must not shift their mean (that would change which responses are paid for);
    whitening advantages does.
    """
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    k1 = log p - log q: unbiased, can be negative per token. k3 = (q/p - 1) - log(q/p): unbiased,
    never negative, lower variance (Schulman, "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by GAE; positions where `mask` is 0 have reward and value 0 and end the episode."""
    mask_f = mask.to(rewards.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask_f[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def length_trend(rewards: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(slope x (length - mean length), slope): the part of a batch's rewards that a least-squares line in
    response length explains. Subtracting it leaves rewards with no linear trend in length, same mean."""
    centred = lengths.float() - lengths.float().mean()
    spread = float((centred ** 2).sum())
    if spread == 0.0:
        return torch.zeros_like(rewards, dtype=torch.float32), 0.0
    slope = float((centred * (rewards.float() - rewards.float().mean())).sum()) / spread
    return slope * centred, slope


def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """For each reward, the mean of the other rewards in its group (consecutive runs of `group_size`: the
    answers to one prompt). Subtracting it pays each answer for beating its siblings (RLOO's baseline)."""
    groups = rewards.reshape(-1, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return others.reshape(rewards.shape)


class KLController:
    """The coefficient of the KL penalty: fixed, or adaptive towards a target KL (Ziegler et al. 2019)."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value = value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
