"""Small statistics shared by stages and evaluation: AUC, ranks, rank correlation, an evenly spread subset."""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def spearman(x, y) -> float:
    """Rank correlation; NaN for fewer than three values or when either side's ranks are all tied (decided on
    the ranks, not on a float spread that rounding can leave above zero)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = average_ranks(np.asarray(x)), average_ranks(np.asarray(y))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def auc(positive_scores, negative_scores) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = average_ranks(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def evenly_spaced(n: int, limit: int) -> np.ndarray:
    """Indices of `limit` of `n` rows spread evenly from the first to the last (all when limit is 0 or
    not below n): a budget that still covers every part of a split."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(int)
