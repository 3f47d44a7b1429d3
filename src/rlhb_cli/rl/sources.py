"""Reward sources: what makes the one PPO engine RLHF, RLHBC, RLHB, RLGAF or the oracle.

A reward source scores text, never token ids, so its judge may tokenize differently from the policy:

    score(queries, responses, behaviors) -> (rewards: float tensor (n,), logs: dict of floats)

`behaviors` holds the behaviour text each response was asked for (None where the prompt had none).
A source that learns while the policy does (RLHB's discriminator) is a `LearningRewardSource`: the
engine calls its `update` once per iteration after the policy update, keeps its state in checkpoints,
probes with a frozen copy of it, and lets it watch its own health. A user's own source is any object
with `score` (or the whole learning protocol), made by a factory given as `module:callable`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rlhb_cli.errors import RlhbError
from rlhb_cli.models.classifier import BehaviorClassifier
from rlhb_cli.models.judge import Judge
from rlhb_cli.prompts import judge_text
from rlhb_cli.simulator.conversations import ConversationGold
from rlhb_cli.simulator.gold import GoldJudge


@dataclass
class GeneratedBatch:
    """What `update` learns from: the iteration's generated triplets and the rewards they were paid."""

    queries: list[str]
    responses: list[str]
    behaviors: list[str | None]
    rewards: torch.Tensor
    iteration: int


@runtime_checkable
class RewardSource(Protocol):
    """Scores (query, response, behaviour) triplets; the engine pays the policy from the score."""

    name: str

    def score(self, queries: list[str], responses: list[str],
              behaviors: list[str | None]) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class LearningRewardSource(RewardSource, Protocol):
    """A reward source that learns between iterations, and whose state a checkpoint must hold."""

    def should_update(self, iteration: int) -> bool:
        """Whether it learns after this iteration."""

    def update(self, batch: GeneratedBatch) -> dict[str, float]:
        """Learn from the iteration's generated triplets; return logs (namespaced, e.g. disc/loss)."""

    def state_dict(self) -> dict:
        """Everything a resumed run needs; its "model" entry holds the weights it learns."""

    def load_state_dict(self, state: dict) -> None: ...

    def frozen_copy(self) -> RewardSource:
        """Itself as it is now, for a yardstick that must not move (the probe)."""

    def watch(self, row: dict, iteration: int) -> str | None:
        """Look at an iteration's logged row (adding figures to it); return a warning when unhealthy."""

    def summary(self) -> dict:
        """Its figures for the stage's summary.json."""


LEARNING_METHODS = ("should_update", "update", "state_dict", "load_state_dict", "frozen_copy", "watch", "summary")


def load_custom(spec: str, **kwargs: Any) -> RewardSource:
    """A user's reward source from `package.module:factory`; the factory gets the run's context as keywords
    it declares (run_dir, seed)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RlhbError(f"--reward-source {spec!r}: give it as package.module:callable")
    if os.getcwd() not in sys.path:  # like uvicorn's --app-dir ".": a module beside the user is found
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RlhbError(f"--reward-source {spec!r}: cannot import it ({exc})") from None
    accepted = inspect.signature(factory).parameters
    source = factory(**{k: v for k, v in kwargs.items() if k in accepted})
    if not callable(getattr(source, "score", None)):
        raise RlhbError(f"--reward-source {spec!r}: made a {type(source).__name__} without a score() method")
    if callable(getattr(source, "update", None)):  # it means to learn: then the engine needs the whole protocol
        missing = [m for m in LEARNING_METHODS if not callable(getattr(source, m, None))]
        if missing:
            raise RlhbError(f"--reward-source {spec!r}: a source that learns (it has update()) needs "
                            f"{', '.join(missing)} too (rlhb_cli.rl.sources.LearningRewardSource)")
    if not hasattr(source, "name"):
        source.name = attribute
    return source


class RewardModelSource:
    """RLHF: the Bradley-Terry reward model of train-reward, on (query, response)."""

    name = "reward-model"

    def __init__(self, path: Path):
        self.judge = Judge.load(path)

    def score(self, queries, responses, behaviors):
        return self.judge.logits([judge_text(q, r) for q, r in zip(queries, responses)]).squeeze(-1), {}


class ClassifierSource:
    """RLHBC: the behaviour classifier's expected behaviour, as the shaped reward or a weighted sum of heads.

    With `head_weights` {metric: w}, reward = sum_m w_m E[m] / (E[pv] + E[clicks]): the shaped reward is
    the special case likes=1, dislikes=-1.
    """

    name = "classifier"

    def __init__(self, path: Path, head_weights: dict[str, float] | None = None):
        self.classifier = BehaviorClassifier.load(path)
        self.head_weights = head_weights

    def score(self, queries, responses, behaviors):
        expected = self.classifier.expected_behavior(queries, responses)
        logs = {f"reward/expected_{m}": float(np.mean(expected[m])) for m in ("pv", "clicks", "likes", "dislikes")}
        if not self.head_weights:
            return torch.as_tensor(expected["shaped_reward"], dtype=torch.float32), logs
        denominator = np.maximum(expected["pv"] + expected["clicks"], 1e-9)
        weighted = sum(w * expected[m] for m, w in self.head_weights.items()) / denominator
        return torch.as_tensor(weighted, dtype=torch.float32), logs


class ConversationOracleSource:
    """TESTBED ONLY: the oracle over conversations: each reply scored by the hidden personas who sent the
    conversation (simulator/conversations.py `ConversationGold`)."""

    name = "oracle"

    def __init__(self, conversations_dir: Path):
        self.gold = ConversationGold(conversations_dir)

    def score(self, queries, responses, behaviors):
        return torch.as_tensor(self.gold.score(list(queries), list(responses)), dtype=torch.float32), {}


class OracleSource:
    """TESTBED ONLY: the simulator's hidden gold user model. The ceiling a learned reward is measured
    against; a policy trained on it is never one to ship, and real logs have no such thing."""

    name = "oracle"

    def __init__(self, environment_json: Path):
        self.gold = GoldJudge.load(environment_json)

    def score(self, queries, responses, behaviors):
        try:
            expected = self.gold.expected_behavior_batch(queries, responses)
        except KeyError as exc:
            raise RlhbError(str(exc.args[0])) from None
        return torch.as_tensor(expected["shaped_reward"], dtype=torch.float32), {}
