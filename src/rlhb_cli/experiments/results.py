"""A recipe's results: each arm's figures per seed, across seeds, the claims judged, and results.md /
results.json / plots written into the experiment's run dir."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from rlhb_cli import rundir, storage
from rlhb_cli.evaluation.report import rolling_mean
from rlhb_cli.experiments.recipe import Recipe, stage_name
from rlhb_cli.experiments.verdicts import METRICS, across, judge_claim, run_units
from rlhb_cli.plots import label_iteration_axis, save_figure

TAIL = 5  # iterations averaged for a run's final figures


def _tail(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.mean(values[-TAIL:])) if values else None


def _margin(accuracy: float | None) -> float | None:
    return None if accuracy is None else accuracy - 0.5


def _curve_sd(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if len(values) < 3:
        return None
    return float(np.std(np.asarray(values) - np.asarray(rolling_mean(values, 5)), ddof=1))


def run_figures(run_dir: Path, name: str, evaluation: dict | None) -> tuple[dict, list[dict]]:
    """(figures, training rows) of one arm's run: what it trained towards and, if evaluated, what gold said."""
    summary = rundir.read_json(run_dir / name / rundir.SUMMARY)
    metrics = run_dir / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if metrics.exists() else []
    rows = [r for r in rows if "objective/reward_mean" in r]
    figures = {"reward_final": _tail(rows, "objective/reward_mean"), "return_final": _tail(rows, "objective/return_mean"),
               "return_curve_sd": _curve_sd(rows, "objective/return_mean"),
               "reward_curve_sd": _curve_sd(rows, "objective/reward_mean"),
               "disc_score_generated_final": _tail(rows, "disc/score_generated"),
               "disc_score_real_final": _tail(rows, "disc/score_real"), "kl_final": _tail(rows, "objective/kl"),
               "disc_acc_fake_margin": _margin(_tail(rows, "disc/acc_fake")),
               "seconds": summary.get("seconds"), "disc_collapsed": summary.get("disc_collapsed")}
    # the spread an iteration of one response would have: the mean of n responses' returns wavers by 1/sqrt(n)
    # from sampling alone, so more responses per iteration must not pass for steadier training by arithmetic
    config = rundir.read_json(run_dir / name / rundir.MANIFEST).get("config", {})
    responses = (config.get("prompts_per_iteration") or 0) * (config.get("rollouts") or 0)
    for key in ("return_curve_sd", "reward_curve_sd"):
        figures[f"{key}_matched"] = figures[key] * math.sqrt(responses) if figures[key] is not None and responses \
            else None
    referee = (evaluation or {}).get("referee", {}).get("policies", {}).get(name, {})
    gains = {"referee_gain": referee.get("gain_over_baseline", {})}
    if evaluation and name in evaluation["scores"]:
        gold = evaluation["scores"][name]
        sampled, greedy = gold.get("sampled", {}).get("gold", {}), gold.get("greedy", {}).get("gold", {})
        raters = gold.get("sampled", {}).get("annotators", {})  # the annotators' taste: the paper's raters' analog
        gains |= {"gold_gain": sampled.get("gain_over_baseline", {}),
                  "gold_gain_greedy": greedy.get("gain_over_baseline", {}),
                  "annotator_gain": raters.get("gain_over_baseline", {})}
        for metric, judged in (("gold_gain", sampled), ("annotator_gain", raters)):  # the query sets apart
            by_set = judged.get("gain_over_baseline", {}).get("by_set", {})
            gains |= {f"{metric}_phrasings": by_set.get("environment", {}), f"{metric}_sealed": by_set.get("sealed", {})}
        wtl = sampled.get("win_tie_loss")
        figures["win_minus_loss"] = wtl["win"] - wtl["loss"] if wtl else None
    figures |= {metric: gain.get("mean") for metric, gain in gains.items()}
    # per query: the units of the intervals (issue 27: queries are a draw too)
    figures["units"] = {metric: gain["by_query"] for metric, gain in gains.items() if gain.get("by_query")}
    return figures, rows


def conversation_figures(policies: dict, name: str, baseline: str) -> dict:
    """ALOE's figures of one policy (evaluate-personalization's summary), its gains over the baseline's."""
    own, base = policies.get(name), policies.get(baseline)
    if own is None or base is None:
        return {}
    figures = {"al_gain": float(np.mean(own["AL"]) - np.mean(base["AL"])), "al_first_gain": own["AL"][0] - base["AL"][0],
               "al_last_gain": own["AL"][-1] - base["AL"][-1], "ir": own["IR"], "ir_gain": own["IR"] - base["IR"],
               "n_ir": own["N-IR"]}
    if "scores" in own and "scores" in base:  # per held-out conversation: the units of the intervals
        mine, theirs = np.array(own["scores"]), np.array(base["scores"])
        turns = np.arange(1, mine.shape[1] + 1)
        slope = lambda s: np.polyfit(turns, s.T, 1)[0] if s.shape[1] > 1 else np.zeros(len(s))  # noqa: E731
        per_unit = {"al_gain": mine.mean(1) - theirs.mean(1), "al_first_gain": mine[:, 0] - theirs[:, 0],
                    "al_last_gain": mine[:, -1] - theirs[:, -1], "ir": slope(mine),
                    "ir_gain": slope(mine) - slope(theirs)}
        figures["units"] = {k: [round(float(x), 4) for x in v] for k, v in per_unit.items()}
    return figures


def base_results(recipe: Recipe, base) -> dict:
    """One base's runs (figures and training rows by (arm, seed)), and what its evaluation says of its baseline,
    references and judges. `base` is a plan.Base: its seed, base_dir and run_dir."""
    evaluation, conversations, out = None, None, base.run_dir
    if recipe.evaluation == "evaluate" and recipe.evaluate is not None:
        evaluation = rundir.read_json(out / "evaluate" / "summary_detail.json")
    elif recipe.evaluate is not None:  # the personalisation suite: AL(k) over turns of held-out personas
        conversations = rundir.read_json(out / recipe.evaluation / rundir.SUMMARY)["policies"]
    baseline_name = (recipe.evaluate or {}).get("baseline", "train-sft")
    runs, curves = {}, {}
    for arm in recipe.arms:
        for seed in recipe.seeds:
            figures, rows = run_figures(out, stage_name(arm.name, seed), evaluation)
            if conversations is not None:
                figures |= conversation_figures(conversations, stage_name(arm.name, seed), baseline_name)
            runs[arm.name, seed], curves[arm.name, seed] = figures, rows
    competence, measured_on, baseline, references = None, "the annotators' order of the SFT policy's answers", None, {}
    if evaluation is not None:
        agreement = evaluation.get("health", {}).get(baseline_name, {}).get("reward_model_agreement_with_annotators", {})
        competence = agreement.get("pair_agreement")
        if agreement.get("trained_facts"):  # the bar is set where the logs could teach it (statistics.py)
            competence = agreement["trained_facts"]["pair_agreement"]
            measured_on += " to questions about facts its pairs cover"
        reward_summary = base.base_dir / "train-reward" / rundir.SUMMARY
        if competence is None and reward_summary.exists():  # real logs: no annotators' gold, only held-out pairs
            competence = rundir.read_json(reward_summary).get("val_pairwise_accuracy")
            measured_on = "its held-out preference pairs"  # e.g. vote-ranked answers
        scores = evaluation["scores"]
        baseline = {d: scores[baseline_name][d]["gold"] for d in scores[baseline_name]
                    if "gold" in scores[baseline_name][d]} or None  # None: real logs, no gold
        references = {name: {d: scores[name][d]["gold"] for d in scores[name] if "gold" in scores[name][d]}
                      for name in recipe.evaluate.get("references", []) if name in scores}
    return {"runs": runs, "curves": curves, "competence": competence, "measured_on": measured_on,
            "baseline_gold": baseline, "references_gold": references, "conversations": conversations,
            "referee_agreement": (evaluation or {}).get("referee", {}).get("agreement"), "run_dir": str(out)}


def run_key(recipe: Recipe, base: int, seed: int):
    """A run's key in per_run: its seed on a recipe of one base, `bBASE-sSEED` on one of several."""
    return f"b{base}-s{seed}" if len(recipe.bases) > 1 else seed


def run_label(arm: str, key) -> str:
    """Which run: ARM-sSEED, or "base BASE: ARM-sSEED" for a key of a recipe with several bases."""
    if isinstance(key, str) and key.startswith("b"):
        base, seed = key[1:].split("-s")
        return f"base {base}: {stage_name(arm, int(seed))}"
    return stage_name(arm, key)


def collect_results(recipe: Recipe, out: Path, bases: list) -> dict:
    """Every base's runs and evaluation (`bases`: plan.Base), the arms across runs, the claims judged."""
    by_base = {base.seed: base_results(recipe, base) for base in bases}
    groups = [[run_key(recipe, b, s) for s in recipe.seeds] for b in by_base]
    keys = [k for group in groups for k in group]
    per_run = {arm.name: {run_key(recipe, b, s): found["runs"][arm.name, s] for b, found in by_base.items()
                          for s in recipe.seeds} for arm in recipe.arms}
    curves = {arm.name: [found["curves"][arm.name, s] for found in by_base.values() for s in recipe.seeds]
              for arm in recipe.arms}
    arms = {}
    for arm in recipe.arms:
        arms[arm.name] = {"stage": arm.command, "options": arm.options}
        for metric in METRICS:
            values = [per_run[arm.name][k].get(metric) for k in keys]
            if all(v is not None for v in values):
                arms[arm.name][metric] = across([float(v) for v in values], keys, groups,
                                                run_units([per_run[arm.name][k] for k in keys], metric, groups, keys))
    claims = [judge_claim(c, per_run, arms, keys, groups) for c in recipe.claims]
    first = by_base[recipe.bases[0]]
    competences = [found["competence"] for found in by_base.values()]
    # RLHF is competent only where every base's reward model is
    competence = None if any(c is None for c in competences) else min(competences)
    if recipe.evaluation == "evaluate" and recipe.evaluate is not None:
        claims = [without_incompetent_rlhf(c, claim, recipe, competence, first["measured_on"])
                  for c, claim in zip(claims, recipe.claims)]
    return {"recipe": str(recipe.path), "base": str(recipe.base_path), "scale": recipe.scale, "seeds": recipe.seeds,
            "bases": recipe.bases, "run_dir": str(out), "base_run_dirs": [str(b.base_dir) for b in bases],
            "git_commit": rundir.git_commit(), "versions": rundir.library_versions(), "arms": arms,
            "per_run": per_run, "claims": claims, "baseline_gold": first["baseline_gold"],
            "rlhf_reward_model_competence": competence, "references_gold": first["references_gold"],
            "referee_agreement": first["referee_agreement"], "conversations": first["conversations"],
            "by_base": {b: {k: found[k] for k in ("run_dir", "competence", "baseline_gold", "referee_agreement",
                                                  "conversations")}
                        for b, found in by_base.items()} if len(by_base) > 1 else None,
            "curves": {a: [[{k: r.get(k) for k in CURVE_KEYS if k in r} | {"step": r.get("step")}
                            for r in rows] for rows in runs] for a, runs in curves.items()}}


# RLHF is a baseline worth beating only when its reward model knows the annotators' taste: it must order the
# SFT policy's answers to a query as the annotators' gold does this often (0.5 is chance)
RLHF_COMPETENCE = 0.65


def without_incompetent_rlhf(result: dict, claim, recipe: Recipe, competence: float | None,
                             measured_on: str = "the annotators' order of the SFT policy's answers") -> dict:
    """A claim against RLHF is "not measured" when RLHF's reward model is not competent: beating or nearing a
    policy trained on a reward below chance says nothing about annotated preferences. Its figure is stated
    either way."""
    rlhf = {a.name for a in recipe.arms if a.command == "train-rlhf"}
    involved = {claim.check.get(k) for k in ("arm", "to", "than")} | set(claim.check.get("arms", []))
    if not rlhf & involved:
        return result
    figure = "unmeasured" if competence is None else f"{competence:.0%}"
    evidence = (result["evidence"] + f"; RLHF's reward model agrees with {measured_on} {figure} of the time "
                f"(needs {RLHF_COMPETENCE:.0%})")
    if competence is not None and competence >= RLHF_COMPETENCE:
        return result | {"evidence": evidence}
    return result | {"verdict": "not measured", "evidence": evidence + ": not a competent baseline"}


CURVE_KEYS = ("objective/reward_mean", "objective/return_mean", "objective/kl", "disc/score_generated",
              "disc/score_real")
CURVE_TITLES = {"objective/reward_mean": "reward (its own source)", "objective/return_mean": "mean return",
                "objective/kl": "KL to reference", "disc/score_generated": "D(real) on generated",
                "disc/score_real": "D(real) on logged"}


def draw_arm_curves(curves: dict[str, list[list[dict]]], out: Path) -> bool:
    """One panel per training figure: each arm's mean over seeds (thick) and its seeds (thin)."""
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib
    matplotlib.use("Agg")
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt
    keys = [k for k in CURVE_KEYS if any(k in r for runs in curves.values() for rows in runs for r in rows)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, (arm, runs) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            series = [[r[key] for r in rows if r.get(key) is not None] for rows in runs]
            series = [s for s in series if s]
            for s in series:
                ax.plot(range(1, len(s) + 1), s, color=colour, alpha=0.2, lw=0.7)
            if series:
                length = min(len(s) for s in series)
                mean = np.mean([s[:length] for s in series], axis=0)
                ax.plot(range(1, length + 1), mean, color=colour, lw=1.6, label=arm)
        label_iteration_axis(ax, CURVE_TITLES[key])
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out)
    return True


def draw_gains(arms: dict, out: Path) -> bool:
    """Each arm's gold gain over SFT (sampled answers) with its 95% interval over seeds."""
    rows = [(name, entry["gold_gain"]) for name, entry in arms.items() if "gold_gain" in entry]
    if not rows:
        return False
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib
    matplotlib.use("Agg")
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(rows) + 1.3))
    for y, (name, entry) in enumerate(rows):
        ci = entry.get("ci95") or [entry["mean"], entry["mean"]]
        ax.barh(y, entry["mean"], color="#4477aa")
        ax.errorbar(entry["mean"], y, xerr=[[entry["mean"] - ci[0]], [ci[1] - entry["mean"]]], color="black",
                    capsize=3, lw=1)
    ax.axvline(0, color="#888888", lw=0.8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_title("gold gain over SFT, sampled answers (mean over seeds, 95% interval)", fontsize=9)
    save_figure(fig, out)
    return True


def _cell(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "-"
    ci = entry.get("ci95")
    return f"{entry['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _seconds(entry: dict | None) -> str:
    return f"{entry['mean']:.0f}" if entry else "-"


def _relative(found: dict, out: Path, path: str) -> str:
    """`path` inside a base's run dir, as results.md (in `out`) links it."""
    return os.path.relpath(Path(found.get("run_dir") or out) / path, out)


def _variance_sentence(recipe: Recipe) -> str:
    units = ("Where the evaluation kept each query's (or held-out conversation's) figure, the interval holds the "
             "queries' draw too (evaluation/intervals.py).")
    if len(recipe.bases) == 1:
        return ("Every figure is the mean over seeds with a 95% t-interval across seeds (the RL stage's seed; the "
                "base, i.e. the logs, SFT policy and judges, is trained once). " + units)
    return (f"Every figure is the mean over {len(recipe.bases)} bases x {len(recipe.seeds)} RL seeds with a 95% "
            f"hierarchical bootstrap interval (bases drawn with replacement, then seeds within each, then queries): "
            f"each base (base seeds {', '.join(map(str, recipe.bases))}) is its own draw of the logs, the query split, "
            f"the SFT policy and the judges, so the interval holds their variance as well as RL's. " + units)


def conversation_table(policies: dict, stage: str, which: str = "") -> list[str]:
    """Every conversing policy's AL(k), IR, N-IR and N-R2 (the baseline and reference rows included)."""
    turns = max(len(p["AL"]) for p in policies.values())
    lines = [f"## Conversations{which}", "", f"Held-out personas converse with each policy ({stage}: AL(k) is the "
             "persona's gold score of the turn-k reply, 0-100; IR its slope in points a turn with a bootstrap interval "
             "over instances).", "", "| policy | " + " | ".join(f"AL({k})" for k in range(1, turns + 1)) +
             " | IR [95%] | N-IR | N-R2 |", "|---|" + "---|" * (turns + 3)]
    for name, p in policies.items():
        low, high = p["IR_interval"]
        lines.append(f"| {name} | " + " | ".join(f"{x:.1f}" for x in p["AL"]) +
                     f" | {p['IR']:+.2f} [{low:+.2f}, {high:+.2f}] | {p['N-IR']:+.2f} | "
                     f"{'-' if p['N-R2'] is None else format(p['N-R2'], '.2f')} |")
    return lines + ["", f"![AL(k) curves]({stage}/al_curves.png)", ""]


def write_results(recipe: Recipe, out: Path, results: dict) -> None:
    """results.json (every number), results.md (claims, tables, plots) and PNGs in the experiment's run dir."""
    has_curves = draw_arm_curves(results["curves"], out / "curves.png")
    has_gains = draw_gains(results["arms"], out / "gains.png")
    lines = [f"# {recipe.name}: {recipe.title}", ""]
    if recipe.scale != "small":
        lines += [f"**Scale {recipe.scale}: a smoke test of the machinery. Its numbers say nothing about the claims.**",
                  ""]
    lines += [f"Recipe `{recipe.path}` (base `{recipe.base_path.name}`), scale {recipe.scale}, seeds "
              f"{', '.join(map(str, recipe.seeds))}; git commit {results['git_commit'] or 'unknown'}. "
              f"Reproduce: `rlhb experiment run {recipe.path} --scale {recipe.scale}`.", "",
              _variance_sentence(recipe), ""]
    if recipe.notes:
        lines += [recipe.notes, ""]
    lines += ["## Claims", "", "| claim | the paper | our rule | ours | verdict |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['paper']} | {c['rule']} ({c['metric']}) | {c['evidence']} | "
                     f"**{c['verdict']}** |")
    shown = [m for m in ("gold_gain", "gold_gain_phrasings", "gold_gain_sealed", "annotator_gain",
                         "annotator_gain_sealed", "gold_gain_greedy", "referee_gain", "win_minus_loss", "al_gain", "al_first_gain",
                         "al_last_gain", "ir", "n_ir", "reward_final", "return_curve_sd", "disc_score_generated_final",
                         "kl_final", "seconds")
             if any(m in a for a in results["arms"].values())]
    lines += ["", "## Arms", "", "| arm | stage | options | " + " | ".join(shown) + " |",
              "|---|---|---|" + "---|" * len(shown)]
    for name, arm in results["arms"].items():
        options = ", ".join(f"{k}={v}" for k, v in arm["options"].items()) or "defaults"
        lines.append(f"| {name} | {arm['stage']} | {options} | " + " | ".join(
            _seconds(arm.get(m)) if m == "seconds" else _cell(arm.get(m)) for m in shown) + " |")
    lines += ["", "What the columns are: " + "; ".join(f"{m}: {METRICS[m]}" for m in shown) + ".", ""]
    nested = results.get("by_base") or {}
    for base, found in (nested.items() if nested else [(None, results)]):
        prefix = f"Base {base}: " if nested else ""
        if found.get("referee_agreement"):
            lines += [f"{prefix}Referee (gold-free): it orders held-out logged answers to sealed queries as their users "
                      f"did in {_cell(found['referee_agreement'].get('pairwise_accuracy'))} of same-query pairs (0.5: "
                      "chance); referee_gain is worth that much.", ""]
        if found.get("baseline_gold"):
            lines += [f"{prefix}SFT baseline's gold score: " + ", ".join(
                f"{d} {_cell(e)}" for d, e in found["baseline_gold"].items()) + " (mean over queries, bootstrap "
                "interval).", ""]
    for name, by_decoding in results.get("references_gold", {}).items():
        lines += [f"Reference `{name}` (evaluated once, as it comes): " + ", ".join(
            f"{d} {_cell(e)}, gain over the baseline {_cell(e.get('gain_over_baseline'))}"
            for d, e in by_decoding.items()) + ".", ""]
    for base, found in (nested.items() if nested else [(None, results)]):
        if found.get("conversations"):
            lines += conversation_table(found["conversations"], _relative(found, out, recipe.evaluation),
                                        f" (base {base})" if nested else "")
    if has_gains:
        lines += ["![gold gain](gains.png)", ""]
    if has_curves:
        lines += ["## Training", "", "![training curves](curves.png)", "",
                  "Thick: mean over seeds; thin: each seed.", ""]
    lines += ["## Per run", "", "| run | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for arm, by_run in results["per_run"].items():
        for key, figures in by_run.items():
            lines.append(f"| {run_label(arm, key)} | " + " | ".join(
                "-" if figures.get(m) is None else f"{figures[m]:+.4f}" if m != "seconds" else f"{figures[m]:.1f}"
                for m in shown) + " |")
    if recipe.evaluation == "evaluate" and recipe.evaluate is not None:
        reports = [f"[base {b}]({_relative(found, out, 'report/report.md')})" for b, found in nested.items()] \
            if nested else ["[report/report.md](report/report.md)"]
        lines += ["", "Per-run detail (judges' trust, behaviour following, sample answers): " + ", ".join(reports)
                  + ".", ""]
    storage.atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    storage.atomic_write_json(out / "results.json", results)
