"""A referee for runs without a gold judge: a judge trained only on the sealed split's logs, never in training.

The sealed queries are cut in two halves by a seeded hash. On each half a ridge regression learns the shaped
reward of the logged answers from frozen MiniLM sentence embeddings of (query, answer), and scores the
other half: its logged answers (how well it orders them as their users did: the referee's own agreement
figure, so a reader knows what it is worth) and the policies' answers to those queries (cross-fitted: no
answer is scored by a referee that saw its query's logs). Nothing a policy or its judges trained on is used.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import torch

from rlhb_cli.evaluation.ordering import per_query_agreement
from rlhb_cli.evaluation.statistics import bootstrap_interval
from rlhb_cli.models.load import load_tokenizer, minilm_path
from rlhb_cli.prompts import judge_text


class Embedder:
    """Mean-pooled, normalised MiniLM embeddings of texts (the frozen encoder sentence-transformers ships)."""

    def __init__(self, max_length: int = 256):
        # deferred: transformers' model classes take seconds to import; evaluate without sealed rows never needs them
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.tokenizer = load_tokenizer(minilm_path(), [])
        self.model = AutoModel.from_pretrained(str(minilm_path())).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def half_of(query: str, seed: int) -> int:
    """0 or 1: the half of the sealed queries a query belongs to (a seeded hash, stable across runs)."""
    return hashlib.blake2b(f"{seed}\0referee\0{query}".encode(), digest_size=8).digest()[0] & 1


def ridge(features: np.ndarray, target: np.ndarray, strength: float) -> tuple[np.ndarray, float]:
    """(weights, intercept) of a ridge regression, solved in closed form on centred data."""
    mean_x, mean_y = features.mean(0), float(target.mean())
    x = features - mean_x
    weights = np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ (target - mean_y))
    return weights, mean_y - float(mean_x @ weights)


def cross_fitted_referee(logged: dict[str, list], answers: dict[str, tuple[list[str], list[str]]],
                         baseline: str, bootstrap_samples: int, seed: int, strength: float = 1.0,
                         embed=None) -> dict:
    """`logged`: the sealed split's query / response / shaped_reward; `answers`: policy -> (queries, responses)
    of its answers to sealed queries. Returns the referee's agreement with behaviour on held-out logged
    answers and each policy's referee score (and gain over `baseline`) with intervals over queries."""
    embed = embed or Embedder()
    queries, responses = logged["query"], logged["response"]
    reward = np.asarray(logged["shaped_reward"], dtype=np.float64)
    halves = np.array([half_of(q, seed) for q in queries])
    if len(set(halves.tolist())) < 2:
        return {"skipped": "the sealed split has too few queries to cut in two halves"}
    x = embed([judge_text(q, r) for q, r in zip(queries, responses)]).astype(np.float64)
    models = {h: ridge(x[halves == h], reward[halves == h], strength) for h in (0, 1)}
    held_out = np.empty(len(queries))
    for h in (0, 1):  # each half scored by the referee that learned on the other
        weights, intercept = models[1 - h]
        held_out[halves == h] = x[halves == h] @ weights + intercept
    groups = defaultdict(list)
    for row, query in enumerate(queries):
        groups[query].append(row)
    accuracy, spearman = per_query_agreement([np.array(g) for g in groups.values() if len(g) >= 2], held_out, reward)
    out: dict = {"answers_logged": len(queries), "queries": len(groups), "method": "ridge on MiniLM embeddings, "
                 "cross-fitted over two halves of the sealed queries", "agreement": {}, "policies": {}}
    for key, values in (("pairwise_accuracy", accuracy), ("spearman", spearman)):
        if values:
            low, high = bootstrap_interval(np.array(values), bootstrap_samples, seed)
            out["agreement"][key] = {"mean": round(float(np.mean(values)), 4), "ci95": [round(low, 4), round(high, 4)]}
    per_query: dict[str, dict[str, float]] = {}
    for name, (asked, said) in answers.items():
        if not asked:
            continue
        features = embed([judge_text(q, r) for q, r in zip(asked, said)]).astype(np.float64)
        scores = np.array([features[i] @ models[1 - half_of(q, seed)][0] + models[1 - half_of(q, seed)][1]
                           for i, q in enumerate(asked)])
        by_query = defaultdict(list)
        for q, s in zip(asked, scores):
            by_query[q].append(s)
        per_query[name] = {q: float(np.mean(v)) for q, v in by_query.items()}
    for name, means in per_query.items():
        values = np.array(list(means.values()))
        low, high = bootstrap_interval(values, bootstrap_samples, seed)
        entry = {"mean": round(float(values.mean()), 4), "ci95": [round(low, 4), round(high, 4)], "queries": len(values)}
        if name != baseline and baseline in per_query:
            shared = sorted(q for q in means if q in per_query[baseline])  # one order for every policy
            delta = np.array([means[q] - per_query[baseline][q] for q in shared])
            low, high = bootstrap_interval(delta, bootstrap_samples, seed)
            entry["gain_over_baseline"] = {"mean": round(float(delta.mean()), 4), "ci95": [round(low, 4), round(high, 4)],
                                           "by_query": [round(float(x), 4) for x in delta]}
        out["policies"][name] = entry
    return out
