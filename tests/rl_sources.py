"""Reward sources the RL tests plug in by dotted path, as a user would plug their own."""

from __future__ import annotations

import torch


class WordReward:
    """Pays 1 for each occurrence of one word in the response."""

    name = "word"

    def __init__(self, word: str):
        self.word = word

    def score(self, queries, responses, behaviors):
        counts = torch.tensor([float(r.lower().split().count(self.word)) for r in responses])
        return counts, {"reward/word_share": float((counts > 0).float().mean())}


def pays_for_the(run_dir=None, seed=0):
    return WordReward("the")


def not_a_source():
    return object()


class NanReward:
    name = "nan"

    def score(self, queries, responses, behaviors):
        rewards = torch.zeros(len(responses))
        rewards[0] = float("nan")
        return rewards, {}


def pays_nan():
    return NanReward()


class RecordingWordReward(WordReward):
    """The word reward, writing what each process scored to RLHB_TEST_RECORD/rank<RANK>.jsonl."""

    def score(self, queries, responses, behaviors):
        import json
        import os
        from pathlib import Path
        counts, logs = super().score(queries, responses, behaviors)
        path = Path(os.environ["RLHB_TEST_RECORD"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"queries": list(queries), "rewards": counts.tolist()}) + "\n")
        return counts, logs


def records_each_process():
    return RecordingWordReward("the")
