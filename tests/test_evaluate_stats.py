"""The arithmetic of evaluate and report against hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from rlhb_cli.evaluation.statistics import answer_draw_se, bootstrap_interval, distinct_2, spearman, win_tie_loss
from rlhb_cli.evaluation.intervals import across_runs
from rlhb_cli.evaluation.report import rolling_mean


def test_win_tie_loss_by_hand():
    policy = np.array([0.5, 0.1, 0.0, -0.2, 0.3])
    baseline = np.array([0.2, 0.1, 0.05, 0.0, np.nan])
    # differences 0.3 (win), 0 (tie), -0.05 (tie at margin 0.1), -0.2 (loss), NaN (unrated: left out)
    assert win_tie_loss(policy, baseline, 0.1) == {"win": 0.25, "tie": 0.5, "loss": 0.25}
    assert win_tie_loss(policy, baseline, 0.0) == {"win": 0.25, "tie": 0.25, "loss": 0.5}


def test_bootstrap_interval_of_a_constant_and_of_two_points():
    assert bootstrap_interval(np.full(10, 0.3), 200, 0) == pytest.approx((0.3, 0.3))
    low, high = bootstrap_interval(np.array([0.0, 1.0]), 4000, 0)
    # means of two draws from {0, 1}: 0 (1/4), 0.5 (1/2), 1 (1/4); the 2.5% and 97.5% points are 0 and 1
    assert (low, high) == (0.0, 1.0)
    low, high = bootstrap_interval(np.arange(100, dtype=float), 2000, 0)
    assert low < 49.5 < high and high - low == pytest.approx(2 * 1.96 * 28.87 / 10, rel=0.15)
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([np.nan]), 10, 0))


def test_answer_draw_se_is_how_far_another_draw_of_answers_moves_the_gain():
    rng = np.random.default_rng(0)
    queries, samples = 200, 4
    true_policy, true_baseline = rng.normal(0.1, 0.2, queries), rng.normal(0.0, 0.2, queries)
    noise_policy, noise_baseline = rng.uniform(0.1, 0.5, queries), rng.uniform(0.1, 0.5, queries)

    def one_evaluation():  # the same queries, fresh answers: per query, the mean of `samples` draws
        policy = true_policy[:, None] + noise_policy[:, None] * rng.standard_normal((queries, samples))
        baseline = true_baseline[:, None] + noise_baseline[:, None] * rng.standard_normal((queries, samples))
        return policy, baseline

    gains = [p.mean(1).mean() - b.mean(1).mean() for p, b in (one_evaluation() for _ in range(2000))]
    expected = math.sqrt(((noise_policy ** 2 + noise_baseline ** 2) / samples).mean() / queries)
    assert np.std(gains) == pytest.approx(expected, rel=0.05)
    policy, baseline = one_evaluation()  # what evaluate computes from one evaluation's answers
    estimate = answer_draw_se(policy.var(1, ddof=1) / samples, baseline.var(1, ddof=1) / samples)
    assert estimate == pytest.approx(expected, rel=0.1)
    with_unrated = answer_draw_se(np.array([0.04, np.nan]), np.array([0.05, 0.01]))  # unrated queries left out
    assert with_unrated == pytest.approx(math.sqrt(0.09))


def test_spearman_distinct_rolling_and_across_runs():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 25])) == pytest.approx(0.8)
    assert math.isnan(spearman(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])))
    with warnings.catch_warnings():  # equal values whose float spread is not 0 (1.4e-17 here) are still all tied
        warnings.simplefilter("error")
        assert math.isnan(spearman(np.array([0.1, 0.1, 0.1]), np.array([1.0, 2, 3])))
    assert distinct_2(["a b a b"]) == pytest.approx(2 / 3)  # bigrams ab, ba, ab
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    single = across_runs([0.2])
    assert single == {"mean": 0.2, "ci95": None, "runs": 1}
    three = across_runs([0.1, 0.2, 0.3])  # sd 0.1, t(2) = 4.30: half-width 4.30 * 0.1 / sqrt(3)
    assert three["ci95"] == pytest.approx([0.2 - 0.24826, 0.2 + 0.24826], abs=1e-4)


def test_agreement_with_gold_by_hand():
    from rlhb_cli.evaluation.statistics import agreement_with_gold
    rows = [{"query": q, "scores": {"gold": g, "judge": j}} for q, g, j in (
        ("a", 0.1, 1.0), ("a", 0.3, 2.0), ("a", 0.2, 3.0),  # pairs: (0.1<0.3 ok) (0.1<0.2 ok) (0.3>0.2 but 2<3)
        ("b", 0.5, None), ("b", 0.4, 0.0))]  # the unrated answer takes no part
    out = agreement_with_gold(rows, ["judge"])["judge"]
    assert out["pair_agreement"] == pytest.approx(2 / 3, abs=1e-4)  # rounded to 4 places
    assert out["spearman"] == pytest.approx(spearman(np.array([1.0, 2, 3, 0]), np.array([0.1, 0.3, 0.2, 0.4])),
                                            abs=1e-4)


def test_the_reward_models_bar_is_set_on_trained_facts_and_the_sealed_worlds_figure_kept_apart():
    """On the sealed world's new facts no judge learned from the logs can know which answer is right: the
    competence a recipe asks of RLHF's reward model is measured on the other queries, the sealed figure beside."""
    from rlhb_cli.evaluation.statistics import reward_model_competence
    rows = [{"query": q, "query_set": s, "scores": {"annotators": a, "reward_model": r}} for q, s, a, r in (
        ("a", "environment", 0.1, 1.0), ("a", "environment", 0.3, 2.0),  # ordered as the annotators do
        ("b", "test", 0.5, 3.0), ("b", "test", 0.4, 1.0),  # so
        ("c", "sealed", 0.2, 2.0), ("c", "sealed", 0.6, 1.0))]  # the other way round
    out = reward_model_competence(rows)
    assert out["trained_facts"]["pair_agreement"] == 1.0 and out["sealed_facts"]["pair_agreement"] == 0.0
    assert out["pair_agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert reward_model_competence(rows[:4])["sealed_facts"] is None


def test_correct_pair_agreement_and_feature_rates_by_hand():
    from rlhb_cli.simulator.attributes import FEATURES
    from rlhb_cli.evaluation.statistics import agreement_with_gold, feature_rates
    rows = [{"query": q, "scores": {"gold": g, "judge": j}, "gold_features": f} for q, g, j, f in (
        ("a", 0.4, 1.0, ["correct", "polite"]), ("a", 0.1, 2.0, ["wrong"]), ("a", 0.2, 0.5, ["wrong", "polite"]),
        ("b", 0.3, 0.9, ["correct"]), ("b", 0.0, 0.1, ["missing"]), ("b", 0.5, 0.9, ["correct", "source"]))]
    # (correct, not) pairs: a: (1.0 vs 2.0: no) (1.0 vs 0.5: yes); b: (0.9 vs 0.1: yes) (0.1 vs 0.9: yes);
    # b's two correct answers are no such pair
    out = agreement_with_gold(rows, ["judge"])["judge"]
    assert out["correct_pair_agreement"] == pytest.approx(3 / 4)
    rates = feature_rates([r["gold_features"] for r in rows])
    assert list(rates) == list(FEATURES)
    assert rates["correct"] == pytest.approx(0.5) and rates["polite"] == pytest.approx(1 / 3, abs=1e-4)
    assert rates["rude"] == 0.0
    assert "correct_pair_agreement" in agreement_with_gold([{k: v for k, v in r.items() if k != "gold_features"}
                                                            for r in rows], ["judge"])["judge"]


def test_across_bases_holds_the_bases_variance_and_is_reproducible():
    from rlhb_cli.evaluation.intervals import across_bases
    groups = [[0.1, 0.1], [0.3, 0.3], [0.5, 0.5]]  # seeds agree within a base; the bases do not
    nested = across_bases(groups)
    assert nested["mean"] == pytest.approx(0.3) and nested["runs"] == 6 and nested["bases"] == 3
    assert nested["ci95"][0] < 0.25 and nested["ci95"][1] > 0.35 and nested == across_bases(groups)
    assert across_runs(groups[0])["ci95"] == [0.1, 0.1]  # one base's seeds alone would say there is no spread
    assert across_bases([[0.1, 0.2, 0.3]]) == across_runs([0.1, 0.2, 0.3])


def test_a_share_has_an_interval_and_a_vanishing_denominator_widens_it_downwards():
    from rlhb_cli.evaluation.intervals import ratio_interval
    steady = ratio_interval([[(0.045, 0.05), (0.046, 0.05), (0.047, 0.05)]])
    assert steady["mean"] == pytest.approx(0.92) and 0.89 < steady["ci95"][0] < steady["ci95"][1] < 0.95
    shaky = ratio_interval([[(0.02, 0.04), (0.02, -0.01)], [(0.02, 0.03), (0.02, -0.02)]])  # b's mean may be <= 0
    assert shaky["ci95"][0] == -math.inf and shaky["mean"] == pytest.approx(0.02 / 0.01)
    assert ratio_interval([[(1.0, 2.0)], [(3.0, 2.0)]]) == ratio_interval([[(1.0, 2.0)], [(3.0, 2.0)]])  # seeded


def test_the_queries_draw_widens_the_interval_and_keeps_pairs_paired():
    """Queries (or held-out conversations) are a draw too: with each run's per-query gains the interval holds
    their variance, on one base (t across seeds widened by the queries' draw) and on several (bootstrap over
    bases, seeds, then queries); gains constant over queries leave it as the seeds make it."""
    from rlhb_cli.evaluation.intervals import across_bases, ratio_interval
    rng = np.random.default_rng(0)
    hard = rng.normal(0, 1.0, 50)  # what each query does, alike in every run
    noisy = [[0.1 + hard + rng.normal(0, 0.01, 50) for _ in range(3)]]  # seeds agree; queries scatter widely
    values = [[float(np.mean(u)) for u in noisy[0]]]
    seeds_only, with_queries = across_bases(values), across_bases(values, units=noisy)
    assert with_queries["mean"] == seeds_only["mean"] and with_queries["unit_draw_se"] > 0.1
    assert with_queries["ci95"][1] - with_queries["ci95"][0] > 3 * (seeds_only["ci95"][1] - seeds_only["ci95"][0])
    flat = [[np.full(50, v) for v in values[0]]]
    assert across_bases(values, units=flat)["ci95"] == pytest.approx(seeds_only["ci95"])
    bases = [[0.1 + rng.normal(0, 1.0, 40) for _ in range(2)] for _ in range(3)]
    means = [[float(np.mean(u)) for u in b] for b in bases]
    nested = across_bases(means, units=bases)
    assert nested == across_bases(means, units=bases) and nested["bases"] == 3
    assert nested["ci95"][1] - nested["ci95"][0] > across_bases(means)["ci95"][1] - across_bases(means)["ci95"][0]
    # a share whose numerator and denominator move together query by query stays tight: the pairs are paired
    together = [[(b, 0.5 * b) for b in (1.0 + rng.normal(0, 1.0, 60) for _ in range(3))]]
    pairs = [[(float(np.mean(a)), float(np.mean(b))) for a, b in together[0]]]
    shared = ratio_interval(pairs, units=together)
    assert shared["ci95"] == pytest.approx([2.0, 2.0])


def test_a_difference_clear_across_seeds_but_not_across_queries_is_direction_only():
    from rlhb_cli.experiments.recipe import Claim
    from rlhb_cli.experiments.verdicts import across, judge_claim
    rng = np.random.default_rng(1)
    per_run = {"a": {}, "b": {}}
    for seed in (0, 1, 2):
        shared = rng.normal(0, 1.0, 80)  # what each query does to both arms alike
        a, b = 0.05 + shared + rng.normal(0, 1.0, 80), shared + rng.normal(0, 1.0, 80)
        a, b = a - a.mean() + 0.05 + 0.001 * seed, b - b.mean()  # seeds agree to the third decimal
        per_run["a"][seed] = {"gold_gain": float(a.mean()), "units": {"gold_gain": list(a)}}
        per_run["b"][seed] = {"gold_gain": float(b.mean()), "units": {"gold_gain": list(b)}}
    claim = Claim("a beats b", "", {"kind": "better", "arm": "a", "than": "b", "metric": "gold_gain"})
    arms = {n: {"gold_gain": across([r["gold_gain"] for r in runs.values()], [0, 1, 2])} for n, runs in per_run.items()}
    assert judge_claim(claim, per_run, arms, [0, 1, 2])["verdict"] == "direction only"
    for runs in per_run.values():
        for figures in runs.values():
            del figures["units"]
    assert judge_claim(claim, per_run, arms, [0, 1, 2])["verdict"] == "reproduced"  # seeds alone: too sure
