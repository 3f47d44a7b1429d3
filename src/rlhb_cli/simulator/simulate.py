"""`rlhb simulate-logs`: the embedded default, a simulated online platform that writes behaviour logs.

Writes `logs.jsonl` (one row per query, response and time window, or one per impression with
`events`), `preferences.jsonl` (annotator pairs for the RLHF baseline) and `environment.json` (the
gold judge; read only by evaluation and the oracle, never by a training stage). It also measures the
ceilings a learner should be held to: the Bayes-optimal AUC of telling real triplets from
behaviour-replaced ones, and how often and how well the most preferred behaviour text occurs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from rlhb_cli.behaviors import binning
from rlhb_cli.config import field
from rlhb_cli.rundir import StageRun
from rlhb_cli.storage import atomic_write_bytes, atomic_write_json
from rlhb_cli.simulator.attributes import FEATURES, Lexicon, QueryKey, feature_matrix
from rlhb_cli.simulator.gold import UserModel, expected_rates
from rlhb_cli.simulator.world import Query, all_queries, candidate_pool, choose_queries, queries_about, sealed_items
from rlhb_cli.stats import auc

STAGE = "simulate-logs"


@dataclass
class SimulateConfig:
    seed: int = field(0, help="Seed of everything random in the environment and its logs.")
    queries: int = field(300, help="Distinct queries in the logs.")
    eval_queries: int = field(100, help="Held-out queries (new phrasings or combinations) kept for evaluation.")
    sealed_facts: int = field(0, help="Facts and tasks sealed away: no log row is about them, and every phrasing of "
                                      "them is kept for evaluation (the sealed world: what no policy can have seen).")
    candidates: int = field(8, help="Legacy-system responses per query.")
    windows: int = field(3, help="Time windows: each (query, response) gets one aggregated row per window.")
    impressions: int = field(3_000_000, help="Impressions in all (more traffic, sharper behaviour signal).")
    zipf_exponent: float = field(1.0, help="Query popularity ~ 1 / rank^exponent (drives page views).")
    ranker_noise: float = field(1.5, help="Noise of the legacy ranker's quality guess (utility units).")
    position_decay: float = field(0.2, help="Exposure falls as exp(-decay * rank position).")
    events: bool = field(False, help="Write one row per impression event instead of aggregated rows.")
    pairs_per_query: int = field(4, help="Annotator preference pairs per query.")
    annotator_noise: float = field(0.1, help="Share of annotator pairs whose label is flipped.")
    bins: int = field(5, help="Levels of the rate bins used to measure the ceilings (as prepare-behaviors' default).")
    ceiling_draws: int = field(200, help="Monte Carlo draws per row for the Bayes ceiling AUC.")

    def __post_init__(self):
        for name in ("queries", "candidates", "windows", "impressions", "bins", "ceiling_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_queries < 0 or self.pairs_per_query < 0:
            raise ValueError("eval_queries and pairs_per_query cannot be negative")
        if not 0.0 <= self.annotator_noise < 0.5:
            raise ValueError(f"annotator_noise must be in [0, 0.5), got {self.annotator_noise}")


def _gold_of(model: UserModel, keys: list[QueryKey], texts: list[str], lexicon: Lexicon):
    features = feature_matrix(keys, texts, lexicon)
    intents = [k.intent for k in keys]
    return features, model.probabilities(features, intents), expected_rates(model, features, intents)["shaped_reward"]


def _sample_counts(rng, impressions_per_row_persona: np.ndarray, p: dict[str, np.ndarray]):
    """views -> clicks | view -> like / dislike | view, for (rows, personas) impression counts."""
    views = rng.binomial(impressions_per_row_persona, p["view"])
    clicks = rng.binomial(views, p["click"])
    likes = rng.binomial(views, p["like"])
    dislikes = rng.binomial(views - likes, np.clip(p["dislike"] / (1.0 - p["like"]), 0.0, 1.0))
    return views, clicks, likes, dislikes


def run(config: SimulateConfig, stage: StageRun) -> dict:
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    model = UserModel.default()
    annotator = UserModel.annotator()
    sealed = sealed_items(rng, config.sealed_facts)
    train_queries, eval_queries = choose_queries(rng, config.queries, config.eval_queries, sealed)
    sealed_queries = queries_about(sealed)

    pools = {q.text: candidate_pool(rng, q, config.candidates) for q in train_queries + eval_queries}
    lexicon = Lexicon()
    for q in train_queries + eval_queries:
        lexicon.add(q.text)
        for text in [q.answer_sentence, *q.wrong_sentences] + [c.text for c in pools[q.text]]:
            lexicon.add(text)
    seen, held = all_queries()
    for q in seen + held:
        lexicon.add(q.text)
        lexicon.add(q.answer_sentence)
    sealed_rng = np.random.default_rng([config.seed, 11])  # the logs' draws do not depend on the sealed world
    for q in sealed_queries:
        pools[q.text] = candidate_pool(sealed_rng, q, config.candidates)
        for c in pools[q.text]:
            lexicon.add(c.text)

    # One row per (query, candidate, window): the legacy ranker reshuffles the pool each window.
    n_q = len(train_queries)
    popularity = 1.0 / np.arange(1, n_q + 1) ** config.zipf_exponent
    popularity = popularity[rng.permutation(n_q)]
    per_query = rng.multinomial(config.impressions, popularity / popularity.sum())
    rows_q, rows_c, rows_w, rows_n = [], [], [], []
    for qi, q in enumerate(train_queries):
        size = len(pools[q.text])
        key = QueryKey(q.intent, q.required, q.rivals)
        pool_features = feature_matrix([key] * size, [c.text for c in pools[q.text]], lexicon)
        pool_utility = model.utilities(pool_features, [q.intent] * size) @ model.shares()
        per_window = rng.multinomial(per_query[qi], np.full(config.windows, 1.0 / config.windows))
        for w in range(config.windows):
            # The legacy ranker orders the pool by a noisy guess of quality, reshuffled every window.
            guess = pool_utility + rng.normal(0.0, config.ranker_noise, size)
            position = np.argsort(np.argsort(-guess))
            exposure = np.exp(-config.position_decay * position)
            counts = rng.multinomial(per_window[w], exposure / exposure.sum())
            rows_q += [qi] * size
            rows_c += list(range(size))
            rows_w += [w] * size
            rows_n += list(counts)
    rows_q, rows_c, rows_w, rows_n = map(np.asarray, (rows_q, rows_c, rows_w, rows_n))
    keys = [QueryKey(q.intent, q.required, q.rivals) for q in train_queries]
    row_keys = [keys[i] for i in rows_q]
    row_texts = [pools[train_queries[qi].text][ci].text for qi, ci in zip(rows_q, rows_c)]
    features, probs, gold = _gold_of(model, row_keys, row_texts, lexicon)
    share = model.shares()
    per_persona = rng.multinomial(rows_n, share)  # rows x personas
    views, clicks, likes, dislikes = (x.sum(1) for x in _sample_counts(rng, per_persona, probs))

    _write_logs(stage, config, rng, model, train_queries, pools, rows_q, rows_c, rows_w, per_persona, probs,
                views, clicks, likes, dislikes)
    n_pairs, pair_ceiling = _write_preferences(stage, config, rng, train_queries, pools, annotator, lexicon)
    ceilings = _ceilings(config, rng, rows_q, rows_n, share, probs, views, clicks, likes, dislikes, gold)
    reference = _write_environment(stage, config, model, annotator, train_queries, eval_queries, pools, lexicon,
                                   sealed_queries)

    summary = {
        "rows": int(len(rows_q)) if not config.events else int(rows_n.sum()),
        "aggregated_rows": int(len(rows_q)),
        "queries": n_q,
        "eval_queries": len(eval_queries),
        "sealed_facts": sealed,
        "sealed_queries": len(sealed_queries),
        "impressions": int(rows_n.sum()),
        "views": int(views.sum()),
        "clicks": int(clicks.sum()),
        "likes": int(likes.sum()),
        "dislikes": int(dislikes.sum()),
        "preference_pairs": n_pairs,
        "pair_accuracy_ceiling": pair_ceiling,
        "intents": {i: sum(q.intent == i for q in train_queries) for i in ("factual", "howto", "chitchat")},
        **ceilings,
        "feature_share_rows": {f: round(float(x), 3) for f, x in zip(FEATURES, features.mean(0))},
        **reference,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return summary


def _write_logs(stage, config, rng, model: UserModel, queries, pools, rows_q, rows_c, rows_w, per_persona, probs, views, clicks, likes,
                dislikes) -> None:
    path = stage.dir / "logs.jsonl"
    if not config.events:
        lines = [json.dumps({"query": queries[qi].text, "response": pools[queries[qi].text][ci].text,
                             "window": int(w), "pv": int(v), "clicks": int(c), "likes": int(lk),
                             "dislikes": int(dk)}, ensure_ascii=False)
                 for qi, ci, w, v, c, lk, dk in zip(rows_q, rows_c, rows_w, views, clicks, likes, dislikes)]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return
    # One line per impression: re-sample per event so each event is a coherent view -> click -> reaction.
    names = [p.name for p in model.personas]
    users_per_persona = 2000
    tmp = path.with_name(".logs.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for r in range(len(rows_q)):
            q = queries[rows_q[r]]
            text = pools[q.text][rows_c[r]].text
            for k, n in enumerate(per_persona[r]):
                if n == 0:
                    continue
                viewed = rng.random(n) < probs["view"][r, k]
                clicked = viewed & (rng.random(n) < probs["click"][r, k])
                reaction = rng.random(n)
                liked = viewed & (reaction < probs["like"][r, k])
                disliked = viewed & ~liked & (reaction < probs["like"][r, k] + probs["dislike"][r, k])
                users = rng.integers(users_per_persona, size=n)
                for e in range(n):
                    out.write(json.dumps({"query": q.text, "response": text, "window": int(rows_w[r]),
                                          "user_id": f"{names[k]}-{users[e]}", "user_segment": names[k],
                                          "viewed": int(viewed[e]), "clicked": int(clicked[e]),
                                          "liked": int(liked[e]), "disliked": int(disliked[e])}) + "\n")
    tmp.replace(path)


def _write_preferences(stage, config, rng, queries, pools, annotator: UserModel, lexicon) -> int:
    """InstructGPT-style pairs from an annotator whose taste differs from the users', with label noise."""
    lines = []
    best_accuracy = []  # what a reward model that knew the annotators' taste exactly would get right
    for q in queries:
        pool = pools[q.text]
        if len(pool) < 2:
            continue
        key = QueryKey(q.intent, q.required, q.rivals)
        features = feature_matrix([key] * len(pool), [c.text for c in pool], lexicon)
        utility = annotator.utilities(features, [q.intent] * len(pool))[:, 0]
        for _ in range(config.pairs_per_query):
            a, b = rng.choice(len(pool), size=2, replace=False)
            p_a = 1.0 / (1.0 + np.exp(-(utility[a] - utility[b])))
            p_a = p_a * (1 - config.annotator_noise) + (1 - p_a) * config.annotator_noise
            best_accuracy.append(max(p_a, 1 - p_a))
            prefer_a = rng.random() < 1.0 / (1.0 + np.exp(-(utility[a] - utility[b])))
            if rng.random() < config.annotator_noise:
                prefer_a = not prefer_a
            chosen, rejected = (a, b) if prefer_a else (b, a)
            lines.append(json.dumps({"prompt": q.text, "chosen": pool[chosen].text, "rejected": pool[rejected].text}))
    atomic_write_bytes(stage.dir / "preferences.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    return len(lines), (round(float(np.mean(best_accuracy)), 4) if best_accuracy else None)


def _ceilings(config, rng, rows_q, rows_n, share, probs, views, clicks, likes, dislikes, gold) -> dict:
    """What any learner could reach on these logs with the default rate bins."""
    spec = binning.fit_bins("rates", config.bins, views, clicks, likes, dislikes, rows_q)
    observed = binning.pattern_codes(spec, binning.apply_bins(spec, views, clicks, likes, dislikes, rows_q))
    best = binning.most_preferred_levels(spec)
    best_code = int(binning.pattern_codes(spec, {m: np.array([best[m]]) for m in binning.METRICS})[0])
    is_best = observed == best_code

    # Bayes ceiling: the best discriminator scores a triplet by P(behaviour | row) / P(behaviour), with
    # P(behaviour | row) from re-simulating each row's traffic and P(behaviour) the logs' marginal.
    n_codes = int(np.prod([spec.levels(m) for m in binning.METRICS]))
    marginal = np.bincount(observed, minlength=n_codes) / len(observed)
    draws = np.empty((config.ceiling_draws, len(rows_q)), dtype=np.int64)
    for d in range(config.ceiling_draws):
        per_persona = rng.multinomial(rows_n, share)
        v, c, lk, dk = (x.sum(1) for x in _sample_counts(rng, per_persona, probs))
        draws[d] = binning.pattern_codes(spec, binning.apply_bins(spec, v, c, lk, dk, rows_q))

    def score(codes: np.ndarray) -> np.ndarray:
        count = (draws == codes[None, :]).sum(0)
        conditional = (count + marginal[codes]) / (config.ceiling_draws + 1.0)
        return np.log(conditional) - np.log(marginal[codes])

    real = score(observed)
    fakes = [score(observed[rng.permutation(len(observed))]) for _ in range(4)]
    return {
        "bayes_ceiling_auc": round(auc(real, np.concatenate(fakes)), 4),
        "most_preferred_share": round(float(is_best.mean()), 4),
        "most_preferred_gold_reward": round(float(gold[is_best].mean()), 4) if is_best.any() else None,
        "gold_reward_mean_rows": round(float(gold.mean()), 4),
    }


def _write_environment(stage, config, model, annotator, train_queries: list[Query], eval_queries: list[Query],
                       pools, lexicon: Lexicon, sealed_queries: list[Query] = ()) -> dict:
    """environment.json: everything the gold judge and the reference points need (evaluation only); split
    "sealed" holds the sealed world's queries."""
    entries, best, mean = [], {"train": [], "eval": [], "sealed": []}, {"train": [], "eval": [], "sealed": []}
    for split, queries in (("train", train_queries), ("eval", eval_queries), ("sealed", sealed_queries)):
        for q in queries:
            pool = pools[q.text]
            key = QueryKey(q.intent, q.required, q.rivals)
            _, _, gold = _gold_of(model, [key] * len(pool), [c.text for c in pool], lexicon)
            best[split].append(float(gold.max()))
            mean[split].append(float(gold.mean()))
            entries.append({"text": q.text, "split": split, "intent": q.intent, "item": q.item,
                            "required": q.required, "rivals": q.rivals, "answer_sentence": q.answer_sentence,
                            "pool": [{"text": c.text, "gold_shaped_reward": round(float(g), 6)}
                                     for c, g in zip(pool, gold)],
                            "best_in_pool": round(float(gold.max()), 6), "pool_mean": round(float(gold.mean()), 6)})
    atomic_write_json(stage.dir / "environment.json", {
        "note": "Hidden user model of the simulated platform. Read by evaluation and the oracle only.",
        "seed": config.seed,
        "user_model": model.to_json(),
        "annotator_model": annotator.to_json(),
        "queries": entries,
        "lexicon": {"words": sorted(lexicon.words), "bigrams": sorted(lexicon.bigrams)},
    })
    return {
        "best_in_pool_gold_reward": {s: round(float(np.mean(v)), 4) for s, v in best.items() if v},
        "pool_mean_gold_reward": {s: round(float(np.mean(v)), 4) for s, v in mean.items() if v},
    }
