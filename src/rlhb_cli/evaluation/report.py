"""`rlhb report`: one Markdown page that answers "did RLHB beat RLHF and RLHBC here, and was training stable?".

Reads the evaluate stage and every aligner's metrics.jsonl and summary.json of one or more run dirs
(e.g. seeds); writes report.md with PNG plots: training curves with rolling means, Win-Tie-Loss bars,
the headline table with intervals, and sample answers side by side. Several run dirs are aggregated:
a policy's figure is the mean over runs, with a t-interval across runs when there are at least two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhb_cli import rundir, storage
from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError
from rlhb_cli.evaluation.intervals import across_runs
from rlhb_cli.plots import label_iteration_axis, save_figure
from rlhb_cli.stages.sft import convergence_note

STAGE = "report"
CURVES = (("objective/reward_mean", "reward (its own source)"), ("objective/return_mean", "return"),
          ("objective/kl", "KL to reference"), ("policy/entropy", "entropy"),
          ("disc/score_generated", "discriminator on generated"), ("disc/score_real", "discriminator on real"))


@dataclass
class ReportConfig:
    run_dirs: list[Path] = field(factory=list, help="Run dirs with an evaluation; several are aggregated.")
    rolling: int = field(5, help="Iterations in the rolling mean of the training curves.")
    samples: int = field(4, help="Queries whose greedy answers are shown side by side.")

    def __post_init__(self):
        if not self.run_dirs:
            raise ValueError("give at least one --run-dir")
        if self.rolling < 1 or self.samples < 0:
            raise ValueError("rolling must be >= 1 and samples >= 0")


def rolling_mean(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def _fmt(entry: dict | None) -> str:
    if not entry:
        return "-"
    ci = entry.get("ci95")
    draw = f" (answers' draw ±{entry['answer_draw_se']:.3f})" if "answer_draw_se" in entry else ""
    return f"{entry['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") + draw


def collect(run_dirs: list[Path]) -> dict:
    evaluations, curves, summaries, samples = [], {}, {}, {}
    for run_dir in run_dirs:
        evaluation = run_dir / "evaluate" / "summary_detail.json"
        if rundir.stage_state(run_dir / "evaluate")[0] != "done" or not evaluation.exists():
            raise RlhbError(f"{run_dir}: no finished evaluation; run `rlhb evaluate --run-dir {run_dir}` first")
        detail = json.loads(evaluation.read_text(encoding="utf-8"))
        evaluations.append(detail)
        for name in detail["scores"]:
            metrics = run_dir / name / "metrics.jsonl"
            if metrics.exists():
                rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
                curves.setdefault(name, []).append([r for r in rows if "objective/reward_mean" in r])
                summaries.setdefault(name, []).append(rundir.read_json(run_dir / name / "summary.json"))
        results = run_dir / "evaluate" / "results.jsonl"
        if results.exists() and not samples:
            for line in results.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["decoding"] == "greedy":
                    samples.setdefault(row["query"], {})[row["policy"]] = row
    return {"evaluations": evaluations, "curves": curves, "summaries": summaries, "samples": samples}


def headline(evaluations: list[dict], judge: str | None = None) -> dict:
    """policy -> decoding -> {mean, ci95, gain, wtl}, on the headline judge (or `judge`), aggregated over runs."""
    judge = judge or evaluations[0]["judge_of_headline"]
    out: dict = {}
    for name in evaluations[0]["scores"]:
        present = [e for e in evaluations if name in e["scores"]]
        out[name] = {}
        for decoding in ("greedy", "sampled"):
            entries = [e["scores"][name][decoding][judge] for e in present
                       if judge in e["scores"][name].get(decoding, {})]
            if not entries:
                continue
            cell = across_runs([x["mean"] for x in entries]) if len(entries) > 1 else dict(entries[0])
            gains = [x["gain_over_baseline"]["mean"] for x in entries if "gain_over_baseline" in x]
            if gains:
                cell["gain"] = across_runs(gains) if len(gains) > 1 else entries[0]["gain_over_baseline"]
            wtl = [x["win_tie_loss"] for x in entries if "win_tie_loss" in x]
            if wtl:
                cell["wtl"] = {k: float(np.mean([w[k] for w in wtl])) for k in ("win", "tie", "loss")}
            out[name][decoding] = cell
    return {"judge": judge, "table": out}


def two_golds(evaluations: list[dict]) -> list[str]:
    """The users' gold and the annotators' side by side: the paper judged with raters (GPT-4, people), whose
    taste is not the users'; a policy may please one and not the other."""
    if not any("annotators" in e["scores"].get(n, {}).get("sampled", {}) for e in evaluations for n in e["scores"]):
        return []
    users, raters = headline(evaluations, "gold")["table"], headline(evaluations, "annotators")["table"]
    lines = ["", "## Two golds: the platform's users and the annotators", "",
             "| policy | users' gain (sampled) | annotators' gain (sampled) | users' gain (greedy) | "
             "annotators' gain (greedy) |", "|---|---|---|---|---|"]
    for name in users:
        cells = [(users if who == "u" else raters).get(name, {}).get(decoding, {}).get("gain")
                 for decoding in ("sampled", "greedy") for who in ("u", "a")]
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


def gold_free_trust(evaluation: dict) -> list[str]:
    """The judges against their users' behaviour on the sealed split: the figures a run without gold has."""
    ordering, sealed = evaluation.get("judge_ordering"), evaluation.get("sealed")
    if not ordering:
        return []
    unseen = ("no training stage read it" if sealed["unseen"] and not sealed["unrecorded"] else
              f"read by training stages: {', '.join(sealed['read_by_training'])}" if sealed["read_by_training"] else
              f"stages made before reads were recorded: {', '.join(sealed['unrecorded'])}")
    lines = ["", "## Gold-free: do the judges order real answers as their users did? (first run dir)", "",
             f"Sealed split ({unseen}): {ordering['answers']} logged answers, {ordering['queries_with_pairs']} "
             "queries with two or more. Share of same-query pairs a judge orders as the behaviour does (0.5: "
             "chance), and Spearman within query; mean [95% CI] over queries. Length and position are trivial "
             "judges: a trained judge is worth trusting only as far as it beats them. Gold judges (the simulator's) "
             "are a reference, not gold-free.", "",
             "| judge | kind | pairs right, shaped reward | pairs right, likes | Spearman, shaped reward |",
             "|---|---|---|---|---|"]
    for name, entry in ordering["judges"].items():
        kind = ("gold (simulator)" if name in ordering.get("gold_judges", []) else
                "trivial baseline" if name in ordering["baselines"] else "gold-free")
        cells = [_fmt(entry["shaped_reward"].get("pairwise_accuracy")), _fmt(entry["likes"].get("pairwise_accuracy")),
                 _fmt(entry["shaped_reward"].get("spearman"))]
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    referee = evaluation.get("referee") or {}
    if referee.get("policies"):
        lines += ["", f"Referee ({referee['method']}; trained on the sealed logs alone, never in training): it orders "
                  f"held-out logged answers as their users did in {_fmt(referee['agreement'].get('pairwise_accuracy'))} "
                  f"of same-query pairs (0.5: chance); its scores of each policy's {referee['decoding']} answers to "
                  f"sealed queries are worth that much.", "", "| policy | referee score | gain over the baseline |",
                  "|---|---|---|"]
        for name, entry in referee["policies"].items():
            lines.append(f"| {name} | {_fmt(entry)} | {_fmt(entry.get('gain_over_baseline'))} |")
    return lines


def draw_curves(curves: dict, window: int, out: Path) -> bool:
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib
    matplotlib.use("Agg")
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt
    panels = [(key, title) for key, title in CURVES if any(key in r for runs in curves.values() for rows in runs
                                                           for r in rows)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], panels):
        for i, (name, runs) in enumerate(sorted(curves.items())):
            colour = colours[i % len(colours)]
            for j, rows in enumerate(runs):
                points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
                if not points:
                    continue
                steps, values = zip(*points)
                ax.plot(steps, values, color=colour, alpha=0.2, lw=0.8)
                ax.plot(steps, rolling_mean(list(values), window), color=colour, lw=1.6, label=name if j == 0 else None)
        label_iteration_axis(ax, title)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out)
    return True


def draw_wtl(table: dict, out: Path) -> bool:
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib
    matplotlib.use("Agg")
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt
    rows = [(name, cell["sampled"]["wtl"]) for name, cell in table.items() if "wtl" in cell.get("sampled", {})]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.4))
    for y, (name, wtl) in enumerate(rows):
        left = 0.0
        for key, colour in (("win", "#228833"), ("tie", "#bbbbbb"), ("loss", "#cc3311")):
            ax.barh(y, wtl[key], left=left, color=colour, label=key if y == 0 else None)
            left += wtl[key]
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.legend(ncol=3, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.set_title("Win-Tie-Loss against the baseline (sampled answers)", fontsize=9)
    save_figure(fig, out)
    return True


def feature_table(health: dict, baseline_name: str | None) -> list[str]:
    """The gold users' attributes of each policy's sampled answers, as shares, the baseline's first and the
    others' as changes from it: what an aligner's gain is made of (being right, or how answers are put)."""
    rates = {n: h["sampled"]["gold_feature_rates"] for n, h in health.items()
             if "gold_feature_rates" in h.get("sampled", {})}
    if not rates:
        return []
    names = list(rates)
    if baseline_name in rates:
        names = [baseline_name] + [n for n in names if n != baseline_name]
    baseline = rates[names[0]]
    features = list(baseline)
    lines = ["", "## What the answers became (gold users' attributes, sampled, first run dir)", "",
             f"Share of answers with each attribute: {names[0]}'s, then each policy's change from it.", "",
             "| policy | " + " | ".join(features) + " |", "|---|" + "---|" * len(features),
             f"| {names[0]} | " + " | ".join(f"{baseline[f]:.3f}" for f in features) + " |"]
    for name in names[1:]:
        lines.append(f"| {name} | " + " | ".join(f"{rates[name][f] - baseline[f]:+.3f}" for f in features) + " |")
    return lines


def verdicts(table: dict) -> list[str]:
    """RLHB against RLHF and RLHBC, and against the oracle, on the sampled gain over the baseline."""
    def gain(name):
        return table.get(name, {}).get("sampled", {}).get("gain")
    lines = []
    rlhb = gain("train-rlhb")
    if rlhb is None:
        return ["No train-rlhb policy was evaluated."]
    for other in ("train-rlhf", "train-rlhbc", "train-rlgaf"):
        theirs = gain(other)
        if theirs is None:
            continue
        difference = rlhb["mean"] - theirs["mean"]
        overlap = rlhb.get("ci95") and theirs.get("ci95") and \
            not (rlhb["ci95"][0] > theirs["ci95"][1] or theirs["ci95"][0] > rlhb["ci95"][1])
        word = "beat" if difference > 0 else "did not beat"
        lines.append(f"RLHB {word} {other.removeprefix('train-').upper()} on the gold gain of sampled answers "
                     f"({rlhb['mean']:+.3f} vs {theirs['mean']:+.3f}, difference {difference:+.3f}"
                     + ("; the intervals overlap, so not clearly)" if overlap else ")"))
    oracle = gain("train-oracle")
    if oracle is not None and oracle["mean"] > 0:
        lines.append(f"RLHB reached {rlhb['mean'] / oracle['mean']:.0%} of the oracle's gain "
                     f"({rlhb['mean']:+.3f} of {oracle['mean']:+.3f}).")
    return lines


def unconverged_policies(summaries: dict[str, list[dict]]) -> list[str]:
    """Evaluated SFT policies still improving when their training stopped: gains over them are read with that."""
    lines = []
    for name, runs in summaries.items():
        for number, summary in enumerate(runs, 1):
            note = convergence_note(summary.get("val_perplexity_by_epoch") or [])
            if note:
                lines.append(f"{name} (run dir {number} of {len(runs)}): {note}.")
                break
    return lines


def run(config: ReportConfig, stage: rundir.StageRun) -> dict:
    data = collect(config.run_dirs)
    for run_dir in config.run_dirs:
        stage.add_input(f"evaluate:{run_dir}", run_dir / "evaluate" / "summary_detail.json")
    table = headline(data["evaluations"])
    has_curves = draw_curves(data["curves"], config.rolling, stage.dir / "curves.png")
    has_wtl = draw_wtl(table["table"], stage.dir / "win_tie_loss.png")
    lines = ["# rlhb report", "", f"Run dirs: {', '.join(str(r) for r in config.run_dirs)}", "",
             f"Judge of the headline: **{table['judge']}**. Means over queries with 95% bootstrap intervals "
             f"(one run) or over runs with 95% t-intervals (several).", "", "## Verdict", ""]
    lines += [f"- {v}" for v in verdicts(table["table"])]
    lines += [f"- {note}" for note in unconverged_policies(data["summaries"])]
    lines += ["", "## Headline", "", "| policy | greedy | sampled | gain over baseline (sampled) | W/T/L (sampled) |",
              "|---|---|---|---|---|"]
    for name, cells in table["table"].items():
        sampled = cells.get("sampled", {})
        wtl = sampled.get("wtl")
        lines.append(f"| {name} | {_fmt(cells.get('greedy'))} | {_fmt(sampled)} | {_fmt(sampled.get('gain'))} | "
                     + (f"{wtl['win']:.2f} / {wtl['tie']:.2f} / {wtl['loss']:.2f}" if wtl else "baseline") + " |")
    references = data["evaluations"][0].get("references", {})
    for key, entry in references.items():
        lines.append(f"| ({key.replace('_', ' ')}) | | {_fmt(entry)} | | |")
    if any("answer_draw_se" in (cells.get("sampled", {}).get("gain") or {}) for cells in table["table"].values()):
        lines += ["", "Answers' draw: the standard error of a gain from the sampled answers alone, the queries held "
                  "fixed: about what evaluating again with another `--seed` moves it by (the interval holds it "
                  "too). Where it is a large part of the gain, more `--samples` pay."]
    lines += two_golds(data["evaluations"])
    lines += gold_free_trust(data["evaluations"][0])
    lines += ["", "## Training", ""]
    if has_curves:
        lines += ["![training curves](curves.png)", "", f"Thin lines: runs; thick: rolling mean over "
                  f"{config.rolling} iterations.", ""]
    lines += ["| stage | reward first -> final | KL final | entropy final | discriminator collapsed | warnings |",
              "|---|---|---|---|---|---|"]
    for name, summaries in sorted(data["summaries"].items()):
        if "reward_final" not in summaries[0]:
            continue
        first = np.mean([s["reward_first"] for s in summaries])
        final = np.mean([s["reward_final"] for s in summaries])
        kl = np.mean([s["kl_final"] for s in summaries])
        entropy = np.mean([s["entropy_final"] for s in summaries if s.get("entropy_final") is not None] or [np.nan])
        collapsed = sum(bool(s.get("disc_collapsed")) for s in summaries)
        warnings = sum(len(s.get("warnings", [])) for s in summaries)
        lines.append(f"| {name} | {first:+.3f} -> {final:+.3f} | {kl:.2f} | {entropy:.2f} | "
                     f"{collapsed} of {len(summaries)} | {warnings} |")
    if has_wtl:
        lines += ["", "## Win-Tie-Loss", "", "![win tie loss](win_tie_loss.png)"]
    health = data["evaluations"][0].get("health", {})
    if health:
        lines += ["", "## Language-model health (first run dir)", "",
                  "| policy | KL to baseline | perplexity on real responses | distinct-2 | length | EOS rate |",
                  "|---|---|---|---|---|---|"]
        for name, h in health.items():
            s = h.get("sampled", h.get("greedy", {}))
            lines.append(f"| {name} | {h.get('kl_to_baseline', float('nan')):.2f} | "
                         f"{h.get('perplexity_real_responses', float('nan')):.3f} | {s.get('distinct_2', 0):.3f} | "
                         f"{s.get('length_tokens', 0):.1f} | {s.get('eos_rate', 0):.2f} |")
    lines += feature_table(health, data["evaluations"][0].get("baseline"))
    agreement = {n: h["judge_agreement_with_gold"] for n, h in health.items() if "judge_agreement_with_gold" in h}
    if agreement:
        judges = list(next(iter(agreement.values())))
        lines += ["", "## Can the judges be trusted? (first run dir)", "",
                  "Each judge against gold on the policy's own sampled answers: Spearman / the share of "
                  "same-query pairs it orders as gold does (0.5 is chance) / the share of same-query (correct, "
                  "wrong) pairs in which it prefers the correct answer. A policy that fooled its judge makes "
                  "that judge agree less on its answers than on the baseline's; a judge near 0.5 on the last "
                  "figure pays for how an answer is put, not for being right.", "",
                  "| policy | " + " | ".join(judges) + " |", "|---|" + "---|" * len(judges)]
        for name, by_judge in agreement.items():
            cells = []
            for j in judges:
                entry = by_judge[j]
                if entry["pair_agreement"] is None:
                    cells.append("-")
                    continue
                right = entry.get("correct_pair_agreement")
                cells.append(f"{entry['spearman']:+.2f} / {entry['pair_agreement']:.2f}"
                             + (f" / {right:.2f}" if right is not None else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    following = {n: h["behavior_following"] for n, h in health.items() if "behavior_following" in h}
    if following:
        lines += ["", "## Behaviour following (first run dir)", "",
                  "Asked for each level of likes (of dislikes), the other metrics at their best: Spearman between "
                  "the level asked and the judged rate per view; 1 means the condition steers users' reaction.", "",
                  "| policy | likes: Spearman | likes rate by level | dislikes: Spearman | dislikes rate by level |",
                  "|---|---|---|---|---|"]
        for name, f in following.items():
            cells = []
            for metric in ("likes", "dislikes"):
                rates = " ".join(f"{x:.3f}" for x in f[metric]["judged_rate_per_level"])
                cells += [f"{f[metric]['spearman']:+.2f}", rates]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if data["samples"]:
        lines += ["", "## Sample answers (greedy, first run dir)", ""]
        for query in list(data["samples"])[:config.samples]:
            lines += [f"**{query}**", "", "| policy | answer | gold |", "|---|---|---|"]
            for name, row in data["samples"][query].items():
                text = row["response"].replace("|", "\\|").replace("\n", " ")
                gold = row["scores"].get("gold")
                lines.append(f"| {name} | {text} | {'' if gold is None else f'{gold:+.3f}'} |")
            lines.append("")
    storage.atomic_write_text(stage.dir / "report.md", "\n".join(lines) + "\n")
    return {"report": str(stage.dir / "report.md"), "runs": len(config.run_dirs),
            "policies": list(table["table"]), "verdict": verdicts(table["table"])}
