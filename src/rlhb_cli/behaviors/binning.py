"""Behaviour binning and the shaped reward.

Two bases (`BinSpec.basis`):
- `counts`, the paper's way: each metric smoothed with log(1+x) and cut into N equal-width bins
  between the smallest and largest smoothed value seen.
- `rates`, the default: clicks, likes and dislikes per view cut at quantiles into N levels, beside a
  3-level view bin of each row's views relative to the mean views of its query's rows. Raw counts mostly
  measure how popular a query is; rates measure how users received the answer, which is what makes the
  most preferred behaviour ("viewed, clicked and liked by many, disliked by few") observable at all.

Edges are computed once (`fit_bins`) and saved, so later data is binned the same way (`apply_bins`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METRICS = ("pv", "clicks", "likes", "dislikes")
VIEW_LEVELS = 3


@dataclass
class BinSpec:
    basis: str  # "counts" or "rates"
    n_bins: int
    edges: dict[str, list[float]]  # metric -> inner edges (ascending, unique)

    def levels(self, metric: str) -> int:
        return len(self.edges[metric]) + 1

    def to_json(self) -> dict:
        return asdict(self) | {"levels": {m: self.levels(m) for m in METRICS}}

    @classmethod
    def from_json(cls, data: dict) -> "BinSpec":
        return cls(basis=data["basis"], n_bins=int(data["n_bins"]), edges={k: list(v) for k, v in data["edges"].items()})


def shaped_reward(pv, clicks, likes, dislikes) -> np.ndarray:
    """(likes - dislikes) / (pv + clicks); defined as 0.0 where pv + clicks == 0 (no exposure, no evidence)."""
    pv, clicks, likes, dislikes = (np.asarray(x, dtype=np.float64) for x in (pv, clicks, likes, dislikes))
    denominator = pv + clicks
    with np.errstate(divide="ignore", invalid="ignore"):
        reward = np.where(denominator > 0, (likes - dislikes) / np.where(denominator > 0, denominator, 1.0), 0.0)
    return reward


def per_view_rates(pv, clicks, likes, dislikes) -> dict[str, np.ndarray]:
    """clicks, likes, dislikes per view; 0.0 for a row with no views."""
    pv = np.asarray(pv, dtype=np.float64)
    safe = np.where(pv > 0, pv, 1.0)
    return {m: np.where(pv > 0, np.asarray(x, dtype=np.float64) / safe, 0.0)
            for m, x in (("clicks", clicks), ("likes", likes), ("dislikes", dislikes))}


def view_share(pv, query_codes) -> np.ndarray:
    """Each row's views over the mean views of its query's rows (1.0 for a query with no views)."""
    pv = np.asarray(pv, dtype=np.float64)
    query_codes = np.asarray(query_codes)
    totals = np.bincount(query_codes, weights=pv)
    counts = np.bincount(query_codes)
    mean = totals[query_codes] / counts[query_codes]
    return np.where(mean > 0, pv / np.where(mean > 0, mean, 1.0), 1.0)


def _basis_values(basis: str, pv, clicks, likes, dislikes, query_codes) -> dict[str, np.ndarray]:
    if basis == "counts":
        return {m: np.log1p(np.asarray(x, dtype=np.float64)) for m, x in zip(METRICS, (pv, clicks, likes, dislikes))}
    if basis == "rates":
        return {"pv": view_share(pv, query_codes)} | per_view_rates(pv, clicks, likes, dislikes)
    raise ValueError(f"unknown behaviour basis {basis!r}: use counts or rates")


def fit_bins(basis: str, n_bins: int, pv, clicks, likes, dislikes, query_codes=None) -> BinSpec:
    """Edges from this data: equal-width on log(1+x) (counts) or quantiles (rates)."""
    values = _basis_values(basis, pv, clicks, likes, dislikes, query_codes)
    edges = {}
    for metric, x in values.items():
        levels = VIEW_LEVELS if (basis == "rates" and metric == "pv") else n_bins
        if x.size == 0:
            edges[metric] = []
            continue
        if basis == "counts":
            lo, hi = float(x.min()), float(x.max())
            inner = np.linspace(lo, hi, levels + 1)[1:-1] if hi > lo else np.array([])
        else:
            inner = np.quantile(x, np.arange(1, levels) / levels)
        # Ties (e.g. many rows with no dislikes) make equal quantiles: keep each edge once, and none at the
        # largest value, whose upper bin would stay empty (a level nobody can be observed at).
        edges[metric] = [float(e) for e in np.unique(inner) if e < x.max()]
    return BinSpec(basis=basis, n_bins=n_bins, edges=edges)


def apply_bins(spec: BinSpec, pv, clicks, likes, dislikes, query_codes=None) -> dict[str, np.ndarray]:
    """Bin index per metric, 0 = lowest. A value equal to an edge falls in the lower bin."""
    values = _basis_values(spec.basis, pv, clicks, likes, dislikes, query_codes)
    side = "right" if spec.basis == "counts" else "left"
    return {m: np.searchsorted(np.asarray(spec.edges[m]), values[m], side=side).astype(np.int64) for m in METRICS}


def most_preferred_levels(spec: BinSpec) -> dict[str, int]:
    """Viewed, clicked and liked by the most; disliked by the fewest."""
    return {"pv": spec.levels("pv") - 1, "clicks": spec.levels("clicks") - 1,
            "likes": spec.levels("likes") - 1, "dislikes": 0}


def pattern_codes(spec: BinSpec, bins: dict[str, np.ndarray]) -> np.ndarray:
    """One integer per row for the tuple of bins (mixed radix over the metrics)."""
    code = np.zeros_like(bins["pv"])
    for metric in METRICS:
        code = code * spec.levels(metric) + bins[metric]
    return code


def decode_pattern(spec: BinSpec, code: int) -> dict[str, int]:
    levels = {}
    for metric in reversed(METRICS):
        code, levels[metric] = divmod(int(code), spec.levels(metric))
    return {m: levels[m] for m in METRICS}
