"""Intervals across runs: RL seeds on one base, bases (each its own logs, SFT policy and judges), and the
queries or conversations a run is judged on.

A run's figure (its gold gain, say) is a mean over the evaluation's units (queries, or held-out personas'
conversations), the same units for every run of a base. Seeds alone leave out that the units are a draw
too: a figure that holds on these 100 queries may not on the next 100. Where the units' figures are known:

- one base: the t-interval across runs, widened by the units' draw: half-width t(n-1) x sqrt(s^2 / n + v),
  s the runs' spread and v the variance of the mean over units of the runs' average per-unit figure;
- several bases: a hierarchical bootstrap, bases drawn with replacement, then the runs of each drawn base,
  then its units (one draw of units for all of a base's runs, so that a paired difference stays paired).

Without them, the seeds' t-interval (one base) or the bootstrap over bases then runs.
"""

from __future__ import annotations

import math

import numpy as np

T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
RESAMPLES = 4000


def across_runs(values: list[float]) -> dict:
    """Mean over runs, with a 95% t-interval when there are two or more."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "runs": len(values)}
    half = T_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "runs": len(values)}


def _matrix(units: list) -> np.ndarray:
    """A base's runs x units figures (None: a unit without a figure, e.g. an unrated answer)."""
    return np.array([[np.nan if u is None else u for u in run] for run in units], dtype=float)


def unit_draw_variance(units: list) -> float:
    """Variance of a base's mean over its units, from the units' draw: var over units of the runs' average
    per-unit figure, divided by the units counted."""
    per_unit = np.nanmean(_matrix(units), axis=0)
    per_unit = per_unit[np.isfinite(per_unit)]
    return float(np.var(per_unit, ddof=1) / len(per_unit)) if len(per_unit) > 1 else 0.0


def nested_draws(groups: list[list], resamples: int, seed: int = 0):
    """Hierarchical bootstrap draws, one a resample: bases with replacement, then the items (runs) of each
    drawn base with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        yield [[g[j] for j in rng.integers(len(g), size=len(g))] for g in drawn]


def nested_unit_draws(matrices: list[np.ndarray], resamples: int, seed: int = 0):
    """Draws of bases, then runs (rows), then units (columns, one draw for the base's runs): per resample, the
    list of drawn sub-matrices."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = []
        for i in rng.integers(len(matrices), size=len(matrices)):
            m = matrices[i]
            rows, cols = rng.integers(m.shape[0], size=m.shape[0]), rng.integers(m.shape[1], size=m.shape[1])
            drawn.append(m[np.ix_(rows, cols)])
        yield drawn


def _mean_of_draw(drawn: list[np.ndarray]) -> float:
    return float(np.mean([np.nanmean(m) for m in drawn]))


def across_bases(groups: list[list[float]], resamples: int = RESAMPLES, seed: int = 0,
                 units: list[list] | None = None) -> dict:
    """Mean over runs nested in bases with a 95% interval (see the module): `groups` the runs' figures per
    base; `units` (optional) each run's per-unit figures, in the same nesting."""
    mean = float(np.mean([np.mean(g) for g in groups]))
    runs = sum(len(g) for g in groups)
    if units is not None and len(groups) == 1:
        entry = across_runs(groups[0])
        variance = unit_draw_variance(units[0])
        spread = float(np.var(groups[0], ddof=1)) / len(groups[0]) if len(groups[0]) > 1 else 0.0
        half = T_975.get(len(groups[0]) - 1, 1.96) * math.sqrt(spread + variance)
        return entry | {"ci95": [mean - half, mean + half], "unit_draw_se": math.sqrt(variance)}
    if len(groups) == 1:
        return across_runs(groups[0])
    if units is not None:
        draws = [_mean_of_draw(d) for d in nested_unit_draws([_matrix(u) for u in units], resamples, seed)]
    else:
        draws = [np.mean([np.mean(g) for g in d]) for d in nested_draws(groups, resamples, seed)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": mean, "ci95": [float(low), float(high)], "runs": runs, "bases": len(groups)}


def ratio_interval(groups: list[list[tuple[float, float]]], resamples: int = RESAMPLES, seed: int = 0,
                   units: list[list[tuple[list, list]]] | None = None) -> dict:
    """mean(a) / mean(b) of paired per-run figures (a, b), nested in bases, with a 95% hierarchical bootstrap
    interval (bases, runs, and units where given): an arm's share of another's gain. Draws whose b averages 0
    or less are no share and count as -inf, so a denominator that may vanish widens the interval downwards
    instead of passing."""
    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else -math.inf
    point = ratio(np.mean([p[0] for g in groups for p in g]), np.mean([p[1] for g in groups for p in g]))
    if units is not None:  # a and b stacked on a first axis, drawn together
        stacks = [np.stack([_matrix([a for a, _ in base]), _matrix([b for _, b in base])]) for base in units]
        rng = np.random.default_rng(seed)
        ratios = []
        for _ in range(resamples):
            a_means, b_means = [], []
            for i in rng.integers(len(stacks), size=len(stacks)):
                s = stacks[i]
                rows, cols = rng.integers(s.shape[1], size=s.shape[1]), rng.integers(s.shape[2], size=s.shape[2])
                drawn = s[:, rows][:, :, cols]
                a_means.append(np.nanmean(drawn[0], axis=1))
                b_means.append(np.nanmean(drawn[1], axis=1))
            ratios.append(ratio(np.mean(np.concatenate(a_means)), np.mean(np.concatenate(b_means))))
    else:
        ratios = [ratio(np.mean([p[0] for g in d for p in g]), np.mean([p[1] for g in d for p in g]))
                  for d in nested_draws(groups, resamples, seed)]
    low, high = np.percentile(ratios, [2.5, 97.5], method="inverted_cdf")  # no interpolation across -inf
    return {"mean": point, "ci95": [float(low), float(high)]}
