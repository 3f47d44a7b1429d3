"""A recipe's results: each arm's figures per seed, across seeds, the claims judged, and results.md /
results.json / plots written into the experiment's run dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rlhb_cli import rundir, storage
from rlhb_cli.evaluation.report import across_runs, rolling_mean
from rlhb_cli.experiments.recipe import Recipe, stage_name
from rlhb_cli.experiments.verdicts import METRICS, judge_claim
from rlhb_cli.plots import label_iteration_axis, save_figure

TAIL = 5  # iterations averaged for a run's final figures


def _tail(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.mean(values[-TAIL:])) if values else None


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
               "seconds": summary.get("seconds"), "disc_collapsed": summary.get("disc_collapsed")}
    # the spread an iteration of one response would have: the mean of n responses' returns wavers by 1/sqrt(n)
    # from sampling alone, so more responses per iteration must not pass for steadier training by arithmetic
    config = rundir.read_json(run_dir / name / rundir.MANIFEST).get("config", {})
    responses = (config.get("prompts_per_iteration") or 0) * (config.get("rollouts") or 0)
    for key in ("return_curve_sd", "reward_curve_sd"):
        figures[f"{key}_matched"] = figures[key] * math.sqrt(responses) if figures[key] is not None and responses \
            else None
    referee = (evaluation or {}).get("referee", {}).get("policies", {}).get(name, {})
    figures["referee_gain"] = referee.get("gain_over_baseline", {}).get("mean")
    if evaluation and name in evaluation["scores"]:
        gold = evaluation["scores"][name]
        sampled, greedy = gold.get("sampled", {}).get("gold", {}), gold.get("greedy", {}).get("gold", {})
        figures["gold_gain"] = sampled.get("gain_over_baseline", {}).get("mean")
        figures["gold_gain_greedy"] = greedy.get("gain_over_baseline", {}).get("mean")
        raters = gold.get("sampled", {}).get("annotators", {})  # the annotators' taste: the paper's raters' analog
        figures["annotator_gain"] = raters.get("gain_over_baseline", {}).get("mean")
        wtl = sampled.get("win_tie_loss")
        figures["win_minus_loss"] = wtl["win"] - wtl["loss"] if wtl else None
    return figures, rows


def conversation_figures(policies: dict, name: str, baseline: str) -> dict:
    """ALOE's figures of one policy (evaluate-personalization's summary), its gains over the baseline's."""
    own, base = policies.get(name), policies.get(baseline)
    if own is None or base is None:
        return {}
    return {"al_gain": float(np.mean(own["AL"]) - np.mean(base["AL"])), "al_first_gain": own["AL"][0] - base["AL"][0],
            "al_last_gain": own["AL"][-1] - base["AL"][-1], "ir": own["IR"], "ir_gain": own["IR"] - base["IR"],
            "n_ir": own["N-IR"]}


def collect_results(recipe: Recipe, out: Path, base_dir: Path) -> dict:
    evaluation, conversations = None, None
    if recipe.evaluation == "evaluate" and recipe.evaluate is not None:
        evaluation = rundir.read_json(out / "evaluate" / "summary_detail.json")
    elif recipe.evaluate is not None:  # the personalisation suite: AL(k) over turns of held-out personas
        conversations = rundir.read_json(out / recipe.evaluation / rundir.SUMMARY)["policies"]
    per_run: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    for arm in recipe.arms:
        for seed in recipe.seeds:
            figures, rows = run_figures(out, stage_name(arm.name, seed), evaluation)
            if conversations is not None:
                figures |= conversation_figures(conversations, stage_name(arm.name, seed),
                                                recipe.evaluate.get("baseline", "train-sft"))
            per_run.setdefault(arm.name, {})[seed] = figures
            curves.setdefault(arm.name, []).append(rows)
    arms = {}
    for arm in recipe.arms:
        arms[arm.name] = {"stage": arm.command, "options": arm.options}
        for metric in METRICS:
            values = [per_run[arm.name][s].get(metric) for s in recipe.seeds]
            if all(v is not None for v in values):
                arms[arm.name][metric] = across_runs([float(v) for v in values])
    claims = [judge_claim(c, per_run, arms, recipe.seeds) for c in recipe.claims]
    competence, measured_on = None, "the annotators' order of the SFT policy's answers"
    if evaluation is not None:
        base_name = recipe.evaluate.get("baseline", "train-sft")
        competence = (evaluation.get("health", {}).get(base_name, {})
                      .get("reward_model_agreement_with_annotators", {}).get("pair_agreement"))
        reward_summary = base_dir / "train-reward" / rundir.SUMMARY
        if competence is None and reward_summary.exists():  # real logs: no annotators' gold, only held-out pairs
            competence = rundir.read_json(reward_summary).get("val_pairwise_accuracy")
            measured_on = "its held-out preference pairs"  # e.g. vote-ranked answers
        claims = [without_incompetent_rlhf(c, claim, recipe, competence, measured_on)
                  for c, claim in zip(claims, recipe.claims)]
    baseline, references = None, {}
    if evaluation is not None:
        base_name = recipe.evaluate.get("baseline", "train-sft")
        baseline = {d: evaluation["scores"][base_name][d]["gold"] for d in evaluation["scores"][base_name]
                    if "gold" in evaluation["scores"][base_name][d]} or None  # None: real logs, no gold
        references = {name: {d: evaluation["scores"][name][d]["gold"] for d in evaluation["scores"][name]
                             if "gold" in evaluation["scores"][name][d]}
                      for name in recipe.evaluate.get("references", []) if name in evaluation["scores"]}
    return {"recipe": str(recipe.path), "base": str(recipe.base_path), "scale": recipe.scale, "seeds": recipe.seeds,
            "run_dir": str(out), "base_run_dir": str(base_dir), "git_commit": rundir.git_commit(),
            "versions": rundir.library_versions(), "arms": arms, "per_run": per_run, "claims": claims,
            "baseline_gold": baseline, "rlhf_reward_model_competence": competence, "references_gold": references,
            "referee_agreement": (evaluation or {}).get("referee", {}).get("agreement"),
            "conversations": conversations,
            "curves": {a: [[{k: r.get(k) for k in CURVE_KEYS if k in r} | {"step": r.get("step")}
                                                     for r in rows] for rows in runs] for a, runs in curves.items()}}



# RLHF is a baseline worth beating only when its reward model knows the annotators' taste: it must order the
# SFT policy's answers to a query as the annotators' gold does this often (0.5 is chance)
RLHF_COMPETENCE = 0.65


def without_incompetent_rlhf(result: dict, claim, recipe: Recipe, competence: float | None,
                             measured_on: str = "the annotators' order of the SFT policy's answers") -> dict:
    """A claim against RLHF is "not measured" when RLHF's reward model is not competent: beating or nearing a
    policy trained on a reward below chance says nothing about annotated preferences."""
    rlhf = {a.name for a in recipe.arms if a.command == "train-rlhf"}
    involved = {claim.check.get(k) for k in ("arm", "to", "than")} | set(claim.check.get("arms", []))
    if not rlhf & involved or (competence is not None and competence >= RLHF_COMPETENCE):
        return result
    figure = "unmeasured" if competence is None else f"{competence:.0%}"
    return result | {"verdict": "not measured", "evidence": result["evidence"] + (
        f"; RLHF's reward model agrees with {measured_on} {figure} of the time "
        f"(needs {RLHF_COMPETENCE:.0%}): not a competent baseline")}


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


def conversation_table(policies: dict, stage: str) -> list[str]:
    """Every conversing policy's AL(k), IR, N-IR and N-R2 (the baseline and reference rows included)."""
    turns = max(len(p["AL"]) for p in policies.values())
    lines = ["## Conversations", "", f"Held-out personas converse with each policy ({stage}: AL(k) is the "
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
              "Every figure is the mean over seeds with a 95% t-interval across seeds (the RL stage's seed; the "
              "base, i.e. the logs, SFT policy and judges, is trained once).", ""]
    if recipe.notes:
        lines += [recipe.notes, ""]
    lines += ["## Claims", "", "| claim | the paper | our rule | ours | verdict |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['paper']} | {c['rule']} ({c['metric']}) | {c['evidence']} | "
                     f"**{c['verdict']}** |")
    shown = [m for m in ("gold_gain", "gold_gain_greedy", "referee_gain", "win_minus_loss", "al_gain", "al_first_gain",
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
    if results.get("referee_agreement"):
        lines += ["Referee (gold-free): it orders held-out logged answers to sealed queries as their users did in "
                  f"{_cell(results['referee_agreement'].get('pairwise_accuracy'))} of same-query pairs (0.5: chance); "
                  "referee_gain is worth that much.", ""]
    if results.get("baseline_gold"):
        lines += ["SFT baseline's gold score: " + ", ".join(f"{d} {_cell(e)}" for d, e in
                                                            results["baseline_gold"].items()) +
                  " (mean over queries, bootstrap interval).", ""]
    for name, by_decoding in results.get("references_gold", {}).items():
        lines += [f"Reference `{name}` (evaluated once, as it comes): " + ", ".join(
            f"{d} {_cell(e)}, gain over the baseline {_cell(e.get('gain_over_baseline'))}"
            for d, e in by_decoding.items()) + ".", ""]
    if results.get("conversations"):
        lines += conversation_table(results["conversations"], recipe.evaluation)
    if has_gains:
        lines += ["![gold gain](gains.png)", ""]
    if has_curves:
        lines += ["## Training", "", "![training curves](curves.png)", "",
                  "Thick: mean over seeds; thin: each seed.", ""]
    lines += ["## Per run", "", "| run | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for arm, by_seed in results["per_run"].items():
        for seed, figures in by_seed.items():
            lines.append(f"| {stage_name(arm, seed)} | " + " | ".join(
                "-" if figures.get(m) is None else f"{figures[m]:+.4f}" if m != "seconds" else f"{figures[m]:.1f}"
                for m in shown) + " |")
    if recipe.evaluation == "evaluate" and recipe.evaluate is not None:
        lines += ["", "Per-run detail (judges' trust, behaviour following, sample answers): "
                  "[report/report.md](report/report.md).", ""]
    storage.atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    storage.atomic_write_json(out / "results.json", results)
