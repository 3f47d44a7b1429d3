"""Claim verdicts: one small rule per kind of claim, each saying reproduced, direction only, not reproduced,
contradicted or not measured, with the evidence it read. A rule reads figures per arm and run (`Evidence`),
and where the evaluation kept them, each run's figures per query or held-out conversation (its `units`):
intervals hold the seeds' variance, the bases' where a recipe trains several, and the units' draw
(evaluation/intervals.py says how).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlhb_cli.evaluation.intervals import across_bases, across_runs, ratio_interval

# Figures of one arm's run that a claim can be judged on; the gold ones need the evaluation.
GOLD_METRICS = {"gold_gain": "gold gain over SFT, sampled answers",
                "gold_gain_greedy": "gold gain over SFT, greedy answers",
                "win_minus_loss": "win rate minus loss rate against SFT, sampled answers",
                "annotator_gain": "the annotators' gold gain over SFT, sampled answers (the paper's raters' analog)",
                "gold_gain_phrasings": "gold gain over SFT on the environment's held-out phrasings of trained facts",
                "gold_gain_sealed": "gold gain over SFT on the sealed world: facts no log row is about",
                "annotator_gain_phrasings": "the annotators' gold gain on the held-out phrasings",
                "annotator_gain_sealed": "the annotators' gold gain on the sealed world",
                "referee_gain": "gold-free: the referee's gain over SFT on sealed queries, sampled answers (a judge "
                                "learned on the sealed logs alone; its agreement with behaviour is in the results)"}
TRAINING_METRICS = {"reward_final": "reward of its own source, mean of the last iterations",
                    "return_final": "mean return, last iterations",
                    "return_curve_sd": "standard deviation of the mean return around its 5-iteration rolling mean",
                    "reward_curve_sd": "standard deviation of the reward around its 5-iteration rolling mean",
                    "return_curve_sd_matched": "return_curve_sd x sqrt(responses per iteration): the spread with the "
                                               "sampling noise of averaging more responses taken out",
                    "reward_curve_sd_matched": "reward_curve_sd x sqrt(responses per iteration), likewise",
                    "disc_score_generated_final": "discriminator's P(real) on generated triplets, last iterations",
                    "disc_score_real_final": "discriminator's P(real) on logged triplets, last iterations",
                    "kl_final": "KL to the reference, last iterations",
                    "disc_acc_fake_margin": "a learning discriminator's accuracy on the generated triplets of its "
                                            "last updates (fresh fakes) minus 0.5: above 0 while it keeps learning",
                    "seconds": "wall time of the run"}
# ALOE's benchmark (evaluate-personalization): held-out personas converse with each policy for K turns
PERSONALIZATION_METRICS = {
    "al_gain": "mean AL(k) over the turns minus the SFT baseline's (points of the persona's 0-100 scale)",
    "al_first_gain": "AL(1) minus the SFT baseline's: the first reply, before the user has said anything",
    "al_last_gain": "AL(K) minus the SFT baseline's: the last turn's reply",
    "ir": "IR: the least-squares slope of AL(k) over the turns, points a turn (> 0: replies improve)",
    "ir_gain": "IR minus the SFT baseline's IR",
    "n_ir": "N-IR: the slope of AL(k) min-max normalised over the turns"}
METRICS = {**GOLD_METRICS, **PERSONALIZATION_METRICS, **TRAINING_METRICS}
CHECK_KINDS = {
    "close_to": "TO's gain has its interval above 0, and the interval of ARM's gain / TO's (hierarchical bootstrap) "
                "lies above SHARE",
    "better": "the per-seed difference ARM - THAN has its interval above 0",
    "decreasing": "the means fall along ARMS and the per-seed difference first - last has its interval above 0",
    "similar": "the per-seed difference ARM - TO has its whole interval within +-WITHIN",
    "reaches": "ARM's mean reaches AT_LEAST while every other arm's stays below",
    "positive": "ARM's figure has its interval across seeds above 0",
}


@dataclass
class Evidence:
    """One metric of every arm: per run (`per_run[arm][run][metric]`, a run being a seed, or a base's seed) and
    across runs (`arms[arm][metric]`); `groups` are the runs of each base when there are several."""

    metric: str
    per_run: dict
    arms: dict
    seeds: list  # the runs' keys
    groups: list[list] | None = None

    def values(self, arm: str) -> list[float] | None:
        got = [self.per_run[arm][s].get(self.metric) for s in self.seeds]
        return None if any(v is None for v in got) else [float(v) for v in got]

    def units(self, arm: str) -> list[np.ndarray] | None:
        return run_units([self.per_run[arm][s] for s in self.seeds], self.metric, self.groups, self.seeds)

    def summary(self, arm: str) -> dict | None:
        return self.arms[arm].get(self.metric)

    def interval(self, values: list[float], units: list | None = None) -> dict:
        return across(values, self.seeds, self.groups, units)

    def ratio(self, arm: str, to: str) -> dict:
        """mean(ARM) / mean(TO) of per-run figures with its interval, nested in bases (and units) as the runs are."""
        groups = self.groups or [self.seeds]
        pairs = dict(zip(self.seeds, zip(self.values(arm), self.values(to))))
        ua, ub = self.units(arm), self.units(to)
        units = None
        if ua is not None and ub is not None and all(len(x) == len(y) for x, y in zip(ua, ub)):
            by_key = dict(zip(self.seeds, zip(ua, ub)))
            units = [[by_key[k] for k in group] for group in groups]
        return ratio_interval([[pairs[k] for k in group] for group in groups], units=units)

    def diff(self, a: str, b: str) -> dict | None:
        """The per-run difference a - b across runs (paired by seed and base, and by unit where known)."""
        va, vb = self.values(a), self.values(b)
        if not va or not vb:
            return None
        ua, ub = self.units(a), self.units(b)
        paired = ua is not None and ub is not None and all(len(x) == len(y) for x, y in zip(ua, ub))
        return self.interval([x - y for x, y in zip(va, vb)], [x - y for x, y in zip(ua, ub)] if paired else None)


def run_units(runs: list[dict], metric: str, groups: list[list] | None, keys: list) -> list[np.ndarray] | None:
    """Each run's per-unit figures of `metric` (None where a run lacks them, or a base's runs were not judged
    on the same number of units, so that they cannot be paired)."""
    got = [r.get("units", {}).get(metric) for r in runs]
    if any(u is None or len(u) < 2 for u in got):
        return None
    units = [np.array([np.nan if x is None else x for x in u], dtype=float) for u in got]
    by_key = dict(zip(keys, units))
    if any(len({len(by_key[k]) for k in group}) > 1 for group in (groups or [keys])):
        return None
    return units


def across(values: list[float], keys: list, groups: list[list] | None = None, units: list | None = None) -> dict:
    """Mean and 95% interval of per-run figures (in the order of `keys`): nested in bases when `groups` holds
    more than one, the units' draw in the interval when each run's `units` are given."""
    groups = groups or [keys]
    if units is None and len(groups) == 1:
        return across_runs(values)
    by_key, by_unit = dict(zip(keys, values)), dict(zip(keys, units or [None] * len(keys)))
    return across_bases([[by_key[k] for k in group] for group in groups],
                        units=[[by_unit[k] for k in group] for group in groups] if units is not None else None)


def above(entry: dict | None) -> bool:
    """Its interval lies above 0."""
    return bool(entry and entry.get("ci95") and entry["ci95"][0] > 0)


def below(entry: dict | None) -> bool:
    return bool(entry and entry.get("ci95") and entry["ci95"][1] < 0)


def fmt(entry: dict | None) -> str:
    if not entry:
        return "n/a"
    ci = entry.get("ci95")
    return f"{entry['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")


def by_interval(entry: dict | None, evidence: str) -> tuple[str, str]:
    """The verdict on a figure the claim says is above 0: by its interval across seeds, else by its mean."""
    if entry is None:
        return "not measured", evidence
    if above(entry):
        return "reproduced", evidence
    if below(entry):
        return "contradicted", evidence
    return ("direction only" if entry["mean"] > 0 else "not reproduced"), evidence


def close_to(check: dict, ev: Evidence) -> tuple[str, str]:
    """ARM comes close to TO when its gain is at least SHARE of TO's: the interval of the ratio of their mean
    gains (hierarchical bootstrap over bases and seeds, paired) must clear SHARE. Against a TO whose own gain
    has an interval reaching 0 there is nothing to come close to: not measured."""
    arm, to, share = check["arm"], check["to"], float(check["share"])
    a, b, va, vb = ev.summary(arm), ev.summary(to), ev.values(arm), ev.values(to)
    if a is None or b is None or va is None or vb is None:
        return "not measured", f"{ev.metric} missing"
    ratio = ev.ratio(arm, to)
    low, high = ratio["ci95"]
    shown = "n/a" if not math.isfinite(ratio["mean"]) else f"{ratio['mean']:.0%}"
    evidence = (f"{arm} {fmt(a)} vs {to} {fmt(b)}; {arm} / {to} = {shown} [{_share(low)}, {_share(high)}] "
                f"(needs above {share:.0%})")
    if not above(b):
        return "not measured", evidence + f" ({to} gains nothing measurable to come close to)"
    if low > share:
        return "reproduced", evidence
    if high < share:
        return "contradicted", evidence
    return ("direction only" if ratio["mean"] > share else "not reproduced"), evidence


def _share(value: float) -> str:
    return f"{value:.0%}" if math.isfinite(value) else "-inf"


def better(check: dict, ev: Evidence) -> tuple[str, str]:
    arm, than = check["arm"], check["than"]
    d = ev.diff(arm, than)
    evidence = f"{arm} - {than} per seed: {fmt(d)} ({arm} {fmt(ev.summary(arm))}, {than} {fmt(ev.summary(than))})"
    return by_interval(d, evidence)


def decreasing(check: dict, ev: Evidence) -> tuple[str, str]:
    names = list(check["arms"])
    means = [ev.summary(a) for a in names]
    if any(m is None for m in means):
        return "not measured", f"{ev.metric} missing"
    falling = all(x["mean"] > y["mean"] for x, y in zip(means, means[1:]))
    d = ev.diff(names[0], names[-1])
    evidence = " > ".join(f"{a} {m['mean']:.4f}" for a, m in zip(names, means)) + \
        f"; {names[0]} - {names[-1]} per seed: {fmt(d)}"
    if falling and above(d):
        return "reproduced", evidence
    return ("direction only" if falling else "not reproduced"), evidence


def similar(check: dict, ev: Evidence) -> tuple[str, str]:
    """Equivalence: the whole interval of the difference within +-WITHIN, so noise makes it harder to claim,
    never easier (an interval that merely straddles 0 says nothing)."""
    arm, to, within = check["arm"], check["to"], float(check["within"])
    d = ev.diff(arm, to)
    evidence = f"{arm} - {to} per seed: {fmt(d)} (similar: the whole interval within +-{within})"
    if d is None or not d.get("ci95"):
        return "not measured", evidence
    low, high = d["ci95"]
    if -within <= low and high <= within:
        return "reproduced", evidence
    if low > within or high < -within:
        return "contradicted", evidence
    return "not reproduced", evidence


def reaches(check: dict, ev: Evidence) -> tuple[str, str]:
    arm, at_least = check["arm"], float(check["at_least"])
    a = ev.summary(arm)
    others = {name: entry.get(ev.metric) for name, entry in ev.arms.items() if name != arm}
    evidence = f"{arm} {fmt(a)} (needs >= {at_least}); " + ", ".join(f"{n} {fmt(e)}" for n, e in others.items())
    if a is None:
        return "not measured", evidence
    if a["mean"] >= at_least and all(e is not None and e["mean"] < at_least for e in others.values()):
        return "reproduced", evidence
    return "not reproduced", evidence


def positive(check: dict, ev: Evidence) -> tuple[str, str]:
    """A figure that is itself a gain or a slope (al_gain, ir): above 0 beyond the seeds' noise."""
    a = ev.summary(check["arm"])
    return by_interval(a, f"{check['arm']} {fmt(a)}")


RULES = {"positive": positive, "close_to": close_to, "better": better, "decreasing": decreasing, "similar": similar, "reaches": reaches}


def judge_claim(claim, per_run: dict, arms: dict, seeds: list, groups: list[list] | None = None) -> dict:
    """The verdict on one claim (a `recipe.Claim`) by its rule."""
    check = claim.check
    verdict, evidence = RULES[check["kind"]](check, Evidence(check["metric"], per_run, arms, seeds, groups))
    return {"claim": claim.claim, "paper": claim.paper, "rule": CHECK_KINDS[check["kind"]], "metric": check["metric"],
            "verdict": verdict, "evidence": evidence}
