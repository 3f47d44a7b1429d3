"""RLHBC's behaviour classifier: expected behaviour of (query, response), read as a reward.

One judge with one head per behaviour metric, each over that metric's bins; the expected counts are
decoded from the bin probabilities (each bin stands for the mean count, or per-view rate, of the training
rows in it) and the paper's shaped reward is computed from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rlhb_cli.behaviors.binning import METRICS, shaped_reward
from rlhb_cli.models.judge import Judge
from rlhb_cli.prompts import judge_text


class BehaviorClassifier:
    """The RLHBC reward: expected behaviour of (query, response) from per-metric bin probabilities."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.heads = judge.meta.heads
        self.table = judge.meta.extra

    @classmethod
    def load(cls, path: Path) -> "BehaviorClassifier":
        return cls(Judge.load(path))

    def probabilities(self, queries: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        logits = self.judge.logits([judge_text(q, r) for q, r in zip(queries, responses)])
        out, start = {}, 0
        for metric, size in self.heads.items():
            out[metric] = torch.softmax(logits[:, start:start + size], dim=-1).numpy()
            start += size
        return out

    def expected_behavior(self, queries: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        """Expected pv, clicks, likes, dislikes and the shaped reward computed from them."""
        probs = self.probabilities(queries, responses)
        n = len(queries)

        def expect(metric: str, key: str) -> np.ndarray:
            if metric in probs:
                return probs[metric] @ np.asarray(self.table[key][metric])
            return np.full(n, self.table["overall"][key][metric])

        if self.table["basis"] == "rates":
            pv = expect("pv", "mean_count")
            counts = {"pv": pv} | {m: pv * expect(m, "mean_rate") for m in ("clicks", "likes", "dislikes")}
        else:
            counts = {m: expect(m, "mean_count") for m in METRICS}
        return counts | {"shaped_reward": shaped_reward(counts["pv"], counts["clicks"], counts["likes"],
                                                        counts["dislikes"])}
