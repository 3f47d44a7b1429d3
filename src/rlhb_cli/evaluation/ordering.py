"""How far each judge can be trusted, from the logs alone: does it order real answers to one query as their
users' behaviour orders them?

On the sealed split (queries no training stage read), every answer logged for a query is scored by each
judge, and for every two answers of one query whose behaviour differs, the judge is right when it puts the
one users rewarded more first (a tie in the judge's score counts a half). Two behaviour targets: the shaped
reward (likes - dislikes over views + clicks) and likes alone. Per query the share of pairs right, and
Spearman's rank correlation over its answers (three or more); means over queries with bootstrap intervals
over queries. Two trivial judges stand beside the trained ones, so a reader knows what "better than chance"
is worth on these logs: the answer's length (longer first) and its position in the log (earlier first).
Nothing here needs a gold judge.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
from rlhb_cli import rundir
from rlhb_cli.evaluation.statistics import bootstrap_interval, spearman as spearman_of

TARGETS = ("shaped_reward", "likes")
BASELINES = {"length": "longer answers first", "position": "answers earlier in the log first"}


def per_query_agreement(groups: list[np.ndarray], scores: np.ndarray, target: np.ndarray) -> tuple[list, list]:
    """(pairwise share right, Spearman) for each query with pairs that differ in `target` (Spearman: 3+ answers)."""
    accuracy, spearman = [], []
    for rows in groups:
        s, t = scores[rows], target[rows]
        i, j = np.triu_indices(len(rows), k=1)
        differ = t[i] != t[j]
        if not differ.any():
            continue
        agree = np.sign(s[i] - s[j]) * np.sign(t[i] - t[j])
        accuracy.append(float(np.mean(np.where(agree[differ] == 0, 0.5, agree[differ] > 0))))
        rho = spearman_of(s, t)
        if np.isfinite(rho):
            spearman.append(rho)
    return accuracy, spearman


def judge_ordering(queries: list[str], responses: list[str], positions: list[int], targets: dict[str, list[float]],
                   scorers: dict[str, Callable[[list[str], list[str]], np.ndarray]], bootstrap_samples: int,
                   seed: int) -> dict:
    """Each judge's (and baseline's) agreement with each behaviour target over the logged answers."""
    by_query: dict[str, list[int]] = defaultdict(list)
    for row, query in enumerate(queries):
        by_query[query].append(row)
    groups = [np.array(rows) for rows in by_query.values() if len(rows) >= 2]
    scored = {name: np.asarray(scorer(queries, responses), dtype=np.float64) for name, scorer in scorers.items()}
    scored["length"] = np.array([len(r) for r in responses], dtype=np.float64)
    scored["position"] = -np.asarray(positions, dtype=np.float64)
    out: dict = {"queries_with_pairs": len(groups), "answers": len(responses), "baselines": BASELINES, "judges": {}}
    for name, scores in scored.items():
        entry = {}
        for target in TARGETS:
            accuracy, spearman = per_query_agreement(groups, scores, np.asarray(targets[target], dtype=np.float64))
            figures = {"queries": len(accuracy)}
            for key, values in (("pairwise_accuracy", accuracy), ("spearman", spearman)):
                if values:
                    low, high = bootstrap_interval(np.array(values), bootstrap_samples, seed)
                    figures[key] = {"mean": round(float(np.mean(values)), 4), "ci95": [round(low, 4), round(high, 4)]}
            entry[target] = figures
        out["judges"][name] = entry
    return out


def sealed_rows(queries: list[str], max_rows: int, seed: int) -> list[int]:
    """Rows of whole queries of the sealed split, a seeded draw of queries until `max_rows` (0: every row)."""
    by_query: dict[str, list[int]] = defaultdict(list)
    for row, query in enumerate(queries):
        by_query[query].append(row)
    if not max_rows or len(queries) <= max_rows:
        return list(range(len(queries)))
    chosen: list[int] = []
    for index in np.random.default_rng([seed, 11]).permutation(len(by_query)):
        rows = list(by_query.values())[index]
        if chosen and len(chosen) + len(rows) > max_rows:
            continue
        chosen += rows
    return sorted(chosen)


def sealed_status(run_dir: Path, sealed: str, evaluator: str) -> dict:
    """Which stages of the run read which splits (their manifests' splits_read): the sealed split is unseen when
    no stage but evaluation read it. A stage made before the record existed is listed as unrecorded."""
    read_it, unrecorded = [], []
    for manifest_path in sorted(Path(run_dir).glob(f"*/{rundir.MANIFEST}")):
        manifest = rundir.read_json(manifest_path)
        if manifest.get("made_by") in (evaluator, "prepare-behaviors", "simulate-logs", "report", None):
            continue
        if "splits_read" not in manifest:
            if manifest.get("made_by", "").startswith(("train-", "warmup-")):
                unrecorded.append(manifest_path.parent.name)
            continue
        if sealed in manifest["splits_read"]:
            read_it.append(manifest_path.parent.name)
    return {"split": sealed, "read_by_training": read_it, "unrecorded": unrecorded, "unseen": not read_it}
