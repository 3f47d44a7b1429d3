"""The PPO arithmetic against hand-computed numbers: GAE, KL estimators, whitening, masks after EOS."""

from __future__ import annotations

import math

import pytest
import torch

from rlhb_cli.rl.core import (KLController, generalized_advantages, kl_per_token, leave_one_out_baseline,
                              length_trend, masked_mean, whiten)
from rlhb_cli.models.generation import response_mask


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    advantages, returns = generalized_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: 2 - 0.1 = 1.9; t=1: 0 + 0.9*0.1 - 0.2 + 0.72*1.9 = 1.258; t=0: 1 + 0.9*0.2 - 0.5 + 0.72*1.258 = 1.58576
    assert advantages.tolist()[0] == pytest.approx([1.58576, 1.258, 1.9])
    assert returns.tolist()[0] == pytest.approx([2.08576, 1.458, 2.0])


def test_gae_ends_the_episode_at_the_mask_and_ignores_what_follows():
    rewards = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # The last real token bootstraps from nothing: A1 = 3 - 0.25; A0 = 1 + 0.25 - 0.5 + A1 = 3.5
    assert advantages.tolist()[0] == pytest.approx([3.5, 2.75, 0.0, 0.0])
    assert returns.tolist()[0][:2] == pytest.approx([4.0, 3.0])


def test_kl_estimators_by_hand_and_unbiased_by_sampling():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(math.exp(-1))  # (e^-1 - 1) + 1
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    for estimator in ("k1", "k3"):
        estimate = kl_per_token(p.log()[tokens], q.log()[tokens], estimator).mean().item()
        assert estimate == pytest.approx(exact, abs=0.01)
    assert (kl_per_token(p.log()[tokens], q.log()[tokens], "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_whitening_uses_only_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    white = whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    kept = white[mask.bool()]
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (white[~mask.bool()] == 0).all()
    shifted = whiten(values, mask, shift_mean=False)
    assert masked_mean(shifted, mask).item() == pytest.approx(3.0, abs=1e-5)


def test_tokens_after_eos_are_masked_and_lengths_include_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 8], [5, 6, 7, 8], [2, 9, 2, 9]])
    truncated, mask, lengths, ended = response_mask(responses, eos, pad)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1] and ended.tolist() == [True, False, True]


def test_adaptive_kl_coefficient_moves_towards_the_target():
    fixed = KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=100)
    adaptive.update(12.0, 100)  # error clipped to +0.2 over a full horizon
    assert adaptive.value == pytest.approx(0.12)
    adaptive.update(3.0, 50)  # error -0.5 clipped to -0.2, half a horizon
    assert adaptive.value == pytest.approx(0.12 * 0.9)


def test_length_trend_removes_what_length_explains_and_nothing_else():
    lengths = torch.tensor([4, 8, 12, 16])
    paid_for_length = 0.5 * lengths + 1.0
    trend, slope = length_trend(paid_for_length, lengths)
    assert slope == pytest.approx(0.5)
    assert (paid_for_length - trend).tolist() == pytest.approx([6.0] * 4)  # flat, at the batch mean
    unrelated = torch.tensor([1.0, -1.0, -1.0, 1.0])  # orthogonal to length: kept as it is
    trend, slope = length_trend(unrelated, lengths)
    assert slope == pytest.approx(0.0) and trend.abs().max() < 1e-6
    trend, slope = length_trend(torch.tensor([1.0, 2.0]), torch.tensor([5, 5]))  # one length: nothing to fit
    assert slope == 0.0 and trend.tolist() == [0.0, 0.0]


def test_leave_one_out_baseline_is_the_mean_of_the_siblings():
    rewards = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])  # two prompts, three answers each
    baseline = leave_one_out_baseline(rewards, 3)
    assert baseline.tolist() == pytest.approx([4.0, 3.5, 1.5, 10.0, 10.0, 10.0])
    centred = rewards - baseline
    assert centred[3:].tolist() == [0.0, 0.0, 0.0]  # a prompt whose answers all score alike teaches nothing
    assert centred[:3].sum() == pytest.approx(0.0)  # a constant added to one prompt's rewards is gone
    assert (rewards + torch.tensor([5.0] * 3 + [0.0] * 3) - leave_one_out_baseline(
        rewards + torch.tensor([5.0] * 3 + [0.0] * 3), 3)).tolist() == pytest.approx(centred.tolist())
