"""RLHB's discriminator and its fakes: the model the warm-up trains and the RL loop's reward source reads.

D(query, response, behaviour text) is the probability that the triplet is a real logged one. Fakes are
logged (query, response) pairs with their behaviour replaced, by three strategies: a random other row's
behaviour; another response's behaviour for the same query; the row's own bin pattern shifted.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rlhb_cli.behaviors.binning import METRICS, BinSpec
from rlhb_cli.behaviors.text import BehaviorTemplate
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.judge import Judge
from rlhb_cli.prompts import judge_text


class Discriminator:
    """D(query, response, behaviour text) = probability that the triplet is a real logged one.

    `factorized`: the judge has one softmax head per metric over (query, response); the logit is
    sum_m log p(bin_m | query, response) - log p(behaviour pattern), the likelihood ratio that the
    Bayes-optimal discriminator thresholds. `joint`: the judge reads the behaviour text too and emits
    one logit.
    """

    def __init__(self, judge: Judge):
        self.judge = judge
        self.form = judge.meta.extra.get("form", "joint")
        if self.form == "factorized":
            self.levels_of_text = judge.meta.extra["levels_of_text"]
            self.log_marginal = judge.meta.extra["log_marginal"]  # text -> log p(behaviour) in training rows
            self.log_marginal_unseen = judge.meta.extra["log_marginal_unseen"]

    @classmethod
    def load(cls, path: Path) -> "Discriminator":
        return cls(Judge.load(path))

    def levels(self, behavior_texts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([[self.levels_of_text[b][m] for m in METRICS] for b in behavior_texts])
        except KeyError as exc:
            raise RlhbError(f"the discriminator knows no behaviour text {exc.args[0]!r}: it renders behaviour with "
                            f"the bins and template of the run's prepare-behaviors") from None

    def logits_from(self, head_logits: torch.Tensor, levels: torch.Tensor, log_marginal: torch.Tensor,
                    metrics: tuple[str, ...] | None = None) -> torch.Tensor:
        """sum over metrics of log p(level | query, response) - log p(behaviour); with `metrics`, the sum over
        those alone and no marginal (a part of the logit, for a reward that leaves some metrics out)."""
        total, start = 0.0, 0
        for m, metric in enumerate(METRICS):
            size = self.judge.meta.heads[metric]
            if metrics is None or metric in metrics:
                log_p = torch.log_softmax(head_logits[:, start:start + size], dim=-1)
                total = total + log_p.gather(1, levels[:, m:m + 1]).squeeze(1)
            start += size
        return total - log_marginal if metrics is None else total

    def marginals(self, behavior_texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.log_marginal.get(b, self.log_marginal_unseen) for b in behavior_texts])

    def texts(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None) -> list[str]:
        """What the judge reads: the behaviour enters the text only in the joint form with behaviour."""
        if self.form == "factorized" or not self.judge.meta.with_behavior:
            return [judge_text(q, r) for q, r in zip(queries, responses)]
        return [judge_text(q, r, b) for q, r, b in zip(queries, responses, behavior_texts)]

    def logits(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None) -> torch.Tensor:
        raw = self.judge.logits(self.texts(queries, responses, behavior_texts))
        if self.form == "factorized":
            return self.logits_from(raw, self.levels(behavior_texts), self.marginals(behavior_texts))
        return raw.squeeze(-1)

    def loss_from_raw(self, raw: torch.Tensor, labels: torch.Tensor, levels: torch.Tensor | None,
                      log_marginal: torch.Tensor | None, label_smoothing: float = 0.0,
                      likelihood_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logit) from the judge's raw output: real/fake cross-entropy, plus in the factorized
        form the per-metric likelihood of the real rows' bins (it keeps the heads calibrated)."""
        smooth_labels = labels * (1 - 2 * label_smoothing) + label_smoothing
        if self.form != "factorized":
            logit = raw.squeeze(-1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, smooth_labels), logit
        logit = self.logits_from(raw, levels, log_marginal)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, smooth_labels)
        real = labels > 0.5
        if likelihood_weight and real.any():
            start, likelihood = 0, 0.0
            for m, metric in enumerate(METRICS):
                size = self.judge.meta.heads[metric]
                likelihood = likelihood + torch.nn.functional.cross_entropy(raw[real, start:start + size],
                                                                            levels[real, m])
                start += size
            loss = loss + likelihood_weight * likelihood
        return loss, logit

    def training_loss(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None,
                      labels: torch.Tensor, label_smoothing: float = 0.0,
                      likelihood_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logit) of a batch of labelled triplets, with gradients (the caller sets train mode).

        A text the judge reads more than once in the batch (factorized: a (query, response) with its real
        behaviour and replaced ones) goes through it once."""
        texts = self.texts(queries, responses, behavior_texts)
        unique = list(dict.fromkeys(texts))
        raw = self.judge.forward_logits(self.judge.encode(unique))
        if len(unique) < len(texts):
            position = {t: i for i, t in enumerate(unique)}
            raw = raw[torch.tensor([position[t] for t in texts])]
        if self.form == "factorized":
            return self.loss_from_raw(raw, labels, self.levels(behavior_texts), self.marginals(behavior_texts),
                                      label_smoothing, likelihood_weight)
        return self.loss_from_raw(raw, labels, None, None, label_smoothing)

    def probability(self, queries: list[str], responses: list[str], behavior_texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.logits(queries, responses, behavior_texts))


def factorized_tables(train, spec: BinSpec, template: BehaviorTemplate) -> dict:
    """Every behaviour text the bins can make -> its levels, and log p(text) among training rows (add-one)."""
    levels_of_text = {}
    for combo in itertools.product(*(range(spec.levels(m)) for m in METRICS)):
        levels = dict(zip(METRICS, combo))
        levels_of_text[template.render(spec, levels)] = levels
    counts = defaultdict(int)
    for text in train["behavior_text"]:
        counts[text] += 1
    total = len(train["behavior_text"]) + len(levels_of_text)
    log_marginal = {text: float(np.log((counts[text] + 1) / total)) for text in levels_of_text}
    return {"form": "factorized", "levels_of_text": levels_of_text, "log_marginal": log_marginal,
            "log_marginal_unseen": float(np.log(1 / total))}


def shifted_text(rng: np.random.Generator, bins: dict[str, int], spec: BinSpec, template: BehaviorTemplate) -> str | None:
    """The row's pattern with likes and dislikes (and maybe another metric) pushed away from the truth."""
    levels = dict(bins)
    for metric in ("likes", "dislikes") + ((METRICS[rng.integers(2)],) if rng.random() < 0.5 else ()):
        top = spec.levels(metric) - 1
        if top == 0:
            continue
        step = int(rng.integers(1, 3))
        levels[metric] = levels[metric] - step if levels[metric] * 2 > top else levels[metric] + step
        levels[metric] = int(np.clip(levels[metric], 0, top))
    if levels == bins:
        return None
    return template.render(spec, levels)


class FakeMaker:
    """Behaviour-replaced fakes of a split's rows; its indexes are built once (the RL loop draws every round)."""

    def __init__(self, split, spec: BinSpec, template: BehaviorTemplate):
        self.texts = list(split["behavior_text"])
        self.queries = list(split["query"])
        self.by_query = defaultdict(list)
        for i, q in enumerate(self.queries):
            self.by_query[q].append(i)
        columns = {m: list(split[f"{m}_bin"]) for m in METRICS}
        self.bins = [{m: columns[m][i] for m in METRICS} for i in range(len(self.texts))]
        self.spec, self.template = spec, template
        if len(set(self.texts)) < 2:
            raise RlhbError("every row has the same behaviour text: there is nothing to tell real from fake")

    def make(self, rng: np.random.Generator, count: int, weights: tuple[float, float, float],
             candidates=None) -> tuple[list[int], list[str], list[str]]:
        """(row index, fake behaviour text, strategy) for `count` fakes of rows drawn from `candidates` (default:
        every row); never the row's own behaviour."""
        texts, queries = self.texts, self.queries
        probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        rows, fakes, kinds = [], [], []
        attempts = 0
        while len(rows) < count and attempts < count * 20:
            attempts += 1
            i = int(rng.integers(len(texts))) if candidates is None else int(candidates[rng.integers(len(candidates))])
            kind = ("random", "same_query", "shifted")[rng.choice(3, p=probabilities)]
            fake = None
            if kind == "same_query":
                others = [j for j in self.by_query[queries[i]] if texts[j] != texts[i]]
                fake = texts[others[rng.integers(len(others))]] if others else None
            elif kind == "shifted":
                fake = shifted_text(rng, self.bins[i], self.spec, self.template)
            if fake is None:  # random, or a strategy that had nothing to offer for this row
                kind = "random"
                fake = texts[int(rng.integers(len(texts)))]
            if fake == texts[i]:
                continue
            rows.append(i)
            fakes.append(fake)
            kinds.append(kind)
        return rows, fakes, kinds


def make_fakes(split, rng: np.random.Generator, count: int, weights: tuple[float, float, float], spec: BinSpec,
               template: BehaviorTemplate) -> tuple[list[int], list[str], list[str]]:
    """(row index, fake behaviour text, strategy) for `count` fakes of random rows of the split."""
    return FakeMaker(split, spec, template).make(rng, count, weights)
