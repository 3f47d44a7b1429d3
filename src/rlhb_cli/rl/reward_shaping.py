"""From a reward source's score to what PPO optimises: the paid reward and the per-token rewards.

Two different things are called "reward" around here. The paper's *shaped reward*, (likes - dislikes) /
(page views + clicks), is what behaviour means (`behaviors/binning.py`); the judges learn it and the
reward sources score it. This module turns a source's raw score into the *paid reward* of each response
(scaled, minus its siblings' mean, minus its linear trend in length, clipped, minus a penalty for a
missing EOS: each an option of `EngineConfig`), then into per-token rewards: the KL penalty to the
reference on every token and the paid reward added at the last one, which GAE turns into advantages.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhb_cli.rl.config import EngineConfig
from rlhb_cli.rl.core import kl_per_token, leave_one_out_baseline, whiten


def paid_reward(raw: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor, repeats: int, config: EngineConfig,
                length_trend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, dict]:
    """(paid reward per response, logs). `repeats` answers per prompt stand consecutively; `length_trend`
    fits the trend of reward in length over the whole batch (every process's share)."""
    logs: dict = {}
    paid = raw * config.shaping.scale
    if config.shaping.group_baseline and repeats > 1:
        paid = paid - leave_one_out_baseline(paid, repeats)
    if config.shaping.length_debias:
        trend, logs["objective/length_slope"] = length_trend(paid, lengths)
        paid = paid - trend
    if config.shaping.clip:
        paid = paid.clamp(-config.shaping.clip, config.shaping.clip)
    if config.shaping.missing_eos_penalty:
        paid = paid - config.shaping.missing_eos_penalty * (~ended).float()
    return paid, logs


def token_rewards(paid: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  lengths: torch.Tensor, kl_coef: float, config: EngineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL to the reference): -kl_coef x KL on every response token, the paid
    reward added at the last one (the EOS, or the last token of a response cut at max_new_tokens)."""
    kl = kl_per_token(logprobs, ref_logprobs, config.kl.estimator) * mask
    rewards = -kl_coef * kl
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += paid
    if config.shaping.whiten:
        rewards = whiten(rewards, mask, shift_mean=False)
    return rewards, kl
