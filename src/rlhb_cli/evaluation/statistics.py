"""The figures evaluation reports, as plain functions of scores: intervals, Win-Tie-Loss, rank correlation,
diversity, the answers' draw, and how far a judge agrees with gold."""

from __future__ import annotations

import numpy as np

from rlhb_cli.simulator.attributes import FEATURES
from rlhb_cli.stats import spearman


def bootstrap_interval(per_query: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling queries."""
    per_query = per_query[np.isfinite(per_query)]  # e.g. a chat judge's reply without a rating
    if len(per_query) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_query[rng.integers(0, len(per_query), size=(resamples, len(per_query)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def win_tie_loss(policy: np.ndarray, baseline: np.ndarray, margin: float) -> dict[str, float]:
    difference = policy - baseline
    difference = difference[np.isfinite(difference)]
    return {"win": float((difference > margin).mean()), "tie": float((np.abs(difference) <= margin).mean()),
            "loss": float((difference < -margin).mean())}


def distinct_2(texts: list[str]) -> float:
    bigrams = [tuple(pair) for t in texts for pair in zip(t.split(), t.split()[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def feature_rates(features: list[list[str]]) -> dict[str, float]:
    """Share of answers with each of the gold users' attributes: what a policy's answers became."""
    return {f: round(float(np.mean([f in present for present in features])), 4) for f in FEATURES}


def agreement_with_gold(rows: list[dict], judges: list[str], gold_judge: str = "gold") -> dict:
    """How far each judge can be trusted on one policy's sampled answers: Spearman with gold over all
    answers, and the share of same-query answer pairs it orders as gold does (0.5 is chance). A judge the
    policy has learned to fool agrees with gold on the policy's own answers less than on SFT's. With the
    gold users' attributes, also the share of same-query (correct, not correct) pairs in which it prefers
    the correct answer: whether it pays for being right or only for how an answer is put. `gold_judge`:
    which gold, the users' or the annotators' (whose taste a reward model on their pairs should learn)."""
    gold = np.array([r["scores"][gold_judge] for r in rows], dtype=np.float64)
    correct = np.array(["correct" in r.get("gold_features", ()) for r in rows])
    by_query: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_query.setdefault(r["query"], []).append(i)
    same_query = [(a, b) for group in by_query.values() for k, a in enumerate(group) for b in group[k + 1:]]
    pairs = [(a, b) for a, b in same_query if abs(gold[a] - gold[b]) > 1e-9]
    right_wrong = [(a, b) if correct[a] else (b, a) for a, b in same_query if correct[a] != correct[b]]
    out = {}
    for judge in judges:
        values = np.array([np.nan if r["scores"][judge] is None else r["scores"][judge] for r in rows])
        finite = np.isfinite(values)
        agree = [np.sign(values[a] - values[b]) == np.sign(gold[a] - gold[b]) for a, b in pairs
                 if finite[a] and finite[b]]
        prefers_right = [values[a] > values[b] for a, b in right_wrong if finite[a] and finite[b] and values[a] != values[b]]
        out[judge] = {"spearman": round(spearman(values[finite], gold[finite]), 4),
                      "pair_agreement": round(float(np.mean(agree)), 4) if agree else None,
                      "correct_pair_agreement": round(float(np.mean(prefers_right)), 4) if prefers_right else None}
    return out


def reward_model_competence(rows: list[dict]) -> dict:
    """How far RLHF's reward model orders one policy's sampled answers as the annotators' gold does: over all
    answers, on the queries about facts its training pairs cover (every set but the sealed world's: the bar a
    recipe asks of it) and on the sealed world's new facts, where no judge learned from the logs can know which
    answer is right (each is printed; the bar is not set there)."""
    trained = [r for r in rows if r["query_set"] != "sealed"]
    sealed = [r for r in rows if r["query_set"] == "sealed"]
    figure = agreement_with_gold(rows, ["reward_model"], "annotators")["reward_model"]
    for key, part in (("trained_facts", trained), ("sealed_facts", sealed)):
        figure[key] = agreement_with_gold(part, ["reward_model"], "annotators")["reward_model"] if part else None
    return figure


def answer_draw_se(policy_variance: np.ndarray, baseline_variance: np.ndarray) -> float:
    """Standard error of a mean gain over queries from the sampled answers alone (the queries held fixed):
    what evaluating the same policies again with another --seed would move it by. The bootstrap interval
    holds it too, with the queries' own spread; when it is a large part of the gain, more --samples pay.
    The two policies' answers count as independent draws; sampled from one seed, they agree while their
    tokens do, so the true figure can be smaller (four draws of the demo's RLHB: SD 0.010 against 0.015)."""
    total = policy_variance + baseline_variance
    total = total[np.isfinite(total)]
    return float(np.sqrt(total.mean() / len(total))) if len(total) else float("nan")


def by_query(delta: np.ndarray) -> list:
    """Per-query gains as results.json keeps them (None: unrated): the units of a recipe's intervals."""
    return [round(float(x), 4) if np.isfinite(x) else None for x in delta]


def gains_by_set(delta: np.ndarray, sets: list[str], resamples: int, seed: int) -> dict:
    """The gain on each query set apart (test, environment phrasings, the sealed world), with its interval."""
    out = {}
    for name in sorted(set(sets)):
        part = delta[np.array([s == name for s in sets])]
        low, high = bootstrap_interval(part, resamples, seed)
        out[name] = {"mean": round(float(np.nanmean(part)), 4), "ci95": [round(low, 4), round(high, 4)],
                     "queries": int(len(part)), "by_query": by_query(part)}
    return out
