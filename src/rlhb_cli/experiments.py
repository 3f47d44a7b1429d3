"""Experiment recipes: the paper's claims as YAML, run as a grid of stages and seeds, judged claim by claim.

A recipe (experiments/NAME.yaml) names a base (the shared stages: simulated logs, SFT policy, judges),
its arms (an RL stage with the options that make it that arm), the seeds, the evaluation, and the
claims with the rule that decides each. `run_recipe` runs the base once per scale into
RUNS/base (RUNS/base-NAME for a recipe whose scales change a base stage), links its stages into
RUNS/NAME, runs every arm for every seed as `ARM-sSEED`, evaluates them all, and writes results.md,
results.json and plots. Stages already done with the same config
are skipped: the run directory's manifests decide, so an interrupted experiment continues where it
stopped. Seeds vary the RL stages; the base is trained once (its seed is its own config's).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from rlhb_cli import pipeline, rundir
from rlhb_cli.errors import RlhbError
from rlhb_cli.plots import label_iteration_axis, save_figure
from rlhb_cli.stages.report import across_runs, rolling_mean

RECIPE_KEYS = {"title", "base", "seeds", "arms", "arm_defaults", "evaluate", "claims", "scales", "notes"}
BASE_KEYS = {"stages", "scales", "expected_seconds", "notes"}
RL_COMMANDS = ("train-rlhf", "train-rlhbc", "train-rlhb", "train-oracle", "train-ppo")
# Figures of one arm's run that a claim can be judged on; the gold ones need the evaluation.
GOLD_METRICS = {"gold_gain": "gold gain over SFT, sampled answers",
                "gold_gain_greedy": "gold gain over SFT, greedy answers",
                "win_minus_loss": "win rate minus loss rate against SFT, sampled answers"}
TRAINING_METRICS = {"reward_final": "reward of its own source, mean of the last iterations",
                    "return_final": "mean return, last iterations",
                    "return_curve_sd": "standard deviation of the mean return around its 5-iteration rolling mean",
                    "reward_curve_sd": "standard deviation of the reward around its 5-iteration rolling mean",
                    "disc_score_generated_final": "discriminator's P(real) on generated triplets, last iterations",
                    "disc_score_real_final": "discriminator's P(real) on logged triplets, last iterations",
                    "kl_final": "KL to the reference, last iterations",
                    "seconds": "wall time of the run"}
METRICS = {**GOLD_METRICS, **TRAINING_METRICS}
CHECK_KINDS = {
    "close_to": "ARM reaches at least SHARE of TO's mean and its interval lies above 0",
    "better": "the per-seed difference ARM - THAN has its interval above 0",
    "decreasing": "the means fall along ARMS and the per-seed difference first - last has its interval above 0",
    "similar": "the per-seed difference ARM - TO has its interval around 0 and |mean| <= WITHIN",
    "reaches": "ARM's mean reaches AT_LEAST while every other arm's stays below",
}
TAIL = 5  # iterations averaged for a run's final figures


# ---------------------------------------------------------------------------------------------- reading
def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Path of every key and item in a YAML document -> its 1-based line, for errors that point at it."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out[path + (key_node.value,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key_node.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


@dataclass
class YamlFile:
    """A parsed YAML mapping that can say where any of its keys is."""

    path: Path
    data: dict
    lines: dict[tuple, int]

    @classmethod
    def read(cls, path: Path) -> "YamlFile":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RlhbError(f"{path}: no such recipe file") from None
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise RlhbError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                            f"({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise RlhbError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
        return cls(Path(path), data, _line_map(node) if node is not None else {})

    def error(self, where: tuple, message: str) -> RlhbError:
        """'FILE:LINE: a.b.c: message', with the line of the deepest key of `where` that is known."""
        line = next((self.lines[where[:n]] for n in range(len(where), 0, -1) if where[:n] in self.lines), None)
        dotted = ".".join(str(p) for p in where)
        return RlhbError(f"{self.path}{f':{line}' if line else ''}: {dotted}: {message}")

    def mapping(self, where: tuple, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(where, f"must be a mapping, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class Arm:
    name: str
    command: str  # the stage command that runs it, e.g. train-rlhb
    options: dict[str, Any]  # the options that make it this arm, over the defaults and the scale


@dataclass
class Claim:
    claim: str
    paper: str
    check: dict[str, Any]


@dataclass
class Step:
    """One stage to run: into which run dir, by which command, under which name, with which options."""

    run_dir: Path
    command: str
    stage_name: str
    options: dict[str, Any]
    arm: str | None = None
    seed: int | None = None
    expected_seconds: float = 0.0


@dataclass
class Recipe:
    name: str
    path: Path
    title: str
    scale: str
    seeds: list[int]
    arms: list[Arm]
    base_path: Path
    base_stages: dict[str, dict]  # command -> options, scale applied
    base_name: str  # folder of the trained base beside the recipes' runs: shared unless the recipe changes it
    arm_defaults: dict[str, dict]  # command -> options every arm of that command starts from, scale applied
    evaluate: dict[str, Any] | None  # options of the evaluation, scale applied; None: no evaluation
    claims: list[Claim]
    expected_seconds: dict[str, float]
    notes: str = ""
    steps: list[Step] = field(default_factory=list)


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out.update(layer or {})
    return out


def _format_seed(options: dict, seed: int) -> dict:
    return {k: v.format(seed=seed) if isinstance(v, str) else v for k, v in options.items()}


def load_recipe(path: Path, scale: str = "small") -> Recipe:
    """Read and check a recipe and its base at a scale: every error names the file, line and key."""
    recipe_file = YamlFile.read(path)
    data = recipe_file.data
    for key in data:
        if key not in RECIPE_KEYS:
            raise recipe_file.error((key,), f"unknown key; known: {', '.join(sorted(RECIPE_KEYS))}")
    for key in ("base", "arms"):
        if key not in data:
            raise recipe_file.error((), f"a recipe needs '{key}'")
    base_path = (Path(path).parent / str(data["base"])).resolve()
    base_file = YamlFile.read(base_path)
    for key in base_file.data:
        if key not in BASE_KEYS:
            raise base_file.error((key,), f"unknown key; known: {', '.join(sorted(BASE_KEYS))}")
    scales = set(base_file.mapping(("scales",), base_file.data.get("scales")))
    if scale not in scales:
        raise RlhbError(f"{base_path}: no scale {scale!r}; scales: {', '.join(sorted(scales)) or 'none'}")
    for name in recipe_file.mapping(("scales",), data.get("scales")):
        if name not in scales:
            raise recipe_file.error(("scales", name), f"unknown scale; the base has {', '.join(sorted(scales))}")
    scale_options = {}
    base_commands = set(base_file.mapping(("stages",), base_file.data.get("stages")))
    changes_base = False
    for source, where in ((base_file, ("scales", scale)), (recipe_file, ("scales", scale))):
        layer = source.mapping(where, (source.data.get("scales") or {}).get(scale))
        changes_base |= source is recipe_file and bool(base_commands & set(layer))
        for command, options in layer.items():
            scale_options[command] = _merge(scale_options.get(command, {}),
                                            source.mapping(where + (command,), options))
    base_stages = {}
    for command, options in base_file.mapping(("stages",), base_file.data.get("stages")).items():
        base_stages[command] = _merge(base_file.mapping(("stages", command), options), scale_options.get(command))
        try:
            pipeline.build_step(command, base_stages[command])
        except RlhbError as exc:
            raise base_file.error(("stages", command), str(exc)) from None
    if "train-sft" not in base_stages:
        raise base_file.error(("stages",), "the base must train the starting policy (train-sft)")

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise recipe_file.error(("seeds",), f"must be a list of distinct non-negative integers, got {seeds!r}")
    arm_defaults = {}
    for command, options in recipe_file.mapping(("arm_defaults",), data.get("arm_defaults")).items():
        arm_defaults[command] = recipe_file.mapping(("arm_defaults", command), options)
    arms: list[Arm] = []
    for name, spec in recipe_file.mapping(("arms",), data["arms"]).items():
        spec = dict(recipe_file.mapping(("arms", name), spec))
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise recipe_file.error(("arms", name), "an arm's name is letters, digits, '-', '_' and '.'")
        command = spec.pop("stage", None)
        if command not in RL_COMMANDS:
            raise recipe_file.error(("arms", name), f"'stage' must be one of {', '.join(RL_COMMANDS)}, got {command!r}")
        arms.append(Arm(name, command, spec))
    if not arms:
        raise recipe_file.error(("arms",), "a recipe needs at least one arm")
    evaluate = data.get("evaluate", {})
    if evaluate is not None:
        evaluate = _merge(recipe_file.mapping(("evaluate",), evaluate), scale_options.get("evaluate"))
        for key in ("policies",):
            if key in evaluate:
                raise recipe_file.error(("evaluate", key), "the runner sets the evaluated policies (every arm)")
    recipe = Recipe(
        name=Path(path).stem, path=Path(path), title=str(data.get("title", Path(path).stem)), scale=scale,
        seeds=seeds, arms=arms, base_path=base_path, base_stages=base_stages,
        # A recipe that changes a base stage trains a base of its own: sharing the folder would make
        # each recipe retrain the other's base in turn.
        base_name=base_path.stem + (f"-{Path(path).stem}" if changes_base else ""),
        arm_defaults={c: _merge(arm_defaults.get(c), scale_options.get(c)) for c in RL_COMMANDS},
        evaluate=evaluate, claims=[], notes=str(data.get("notes", "")).strip(),
        expected_seconds={str(k): float(v) for k, v in base_file.mapping(
            ("expected_seconds", scale), (base_file.data.get("expected_seconds") or {}).get(scale)).items()})
    recipe.claims = _read_claims(recipe_file, recipe)
    _check_arm_options(recipe_file, recipe)
    return recipe


def _read_claims(source: YamlFile, recipe: Recipe) -> list[Claim]:
    claims = []
    arm_names = {a.name for a in recipe.arms}
    for i, item in enumerate(source.data.get("claims") or []):
        where = ("claims", i)
        item = source.mapping(where, item)
        unknown = set(item) - {"claim", "paper", "check"}
        if unknown or "claim" not in item or "check" not in item:
            raise source.error(where, "a claim has 'claim', 'paper' and 'check'"
                               + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        check = source.mapping(where + ("check",), item["check"])
        kind = check.get("kind")
        if kind not in CHECK_KINDS:
            raise source.error(where + ("check",), f"kind must be one of {', '.join(CHECK_KINDS)}, got {kind!r}")
        metric = check.get("metric")
        if metric not in METRICS:
            raise source.error(where + ("check", "metric"), f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        if metric in GOLD_METRICS and recipe.evaluate is None:
            raise source.error(where + ("check", "metric"), f"{metric} needs the evaluation (evaluate: is null)")
        named = [check[k] for k in ("arm", "than", "to") if k in check] + list(check.get("arms", []))
        for arm in named:
            if arm not in arm_names:
                raise source.error(where + ("check",), f"no arm {arm!r}; arms: {', '.join(sorted(arm_names))}")
        required = {"close_to": ("arm", "to", "share"), "better": ("arm", "than"), "decreasing": ("arms",),
                    "similar": ("arm", "to", "within"), "reaches": ("arm", "at_least")}[kind]
        missing = [k for k in required if k not in check]
        if missing:
            raise source.error(where + ("check",), f"{kind} needs {', '.join(missing)}")
        claims.append(Claim(str(item["claim"]).strip(), str(item.get("paper", "")).strip(), check))
    return claims


def _check_arm_options(source: YamlFile, recipe: Recipe) -> None:
    """Build every arm's config for every seed now, so a bad option fails before hours of running."""
    earlier: set[str] = set(recipe.base_stages)
    for arm in recipe.arms:
        for seed in recipe.seeds:
            options = arm_options(recipe, arm, seed)
            try:
                pipeline.build_step(arm.command, options)
            except RlhbError as exc:
                raise source.error(("arms", arm.name), str(exc)) from None
            start = options.get("init_from", "train-sft")
            if start not in earlier and "/" not in start:
                raise source.error(("arms", arm.name, "init_from"), f"{start!r} is neither a base stage nor an "
                                   f"earlier arm's run ({', '.join(sorted(earlier))})")
        earlier |= {stage_name(arm.name, s) for s in recipe.seeds}


def arm_options(recipe: Recipe, arm: Arm, seed: int) -> dict:
    """Options of one arm's run: the recipe's arm defaults < the scale < the arm's own < its seed."""
    return _format_seed(_merge(recipe.arm_defaults.get(arm.command), arm.options, {"seed": seed}), seed)


def stage_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


# ---------------------------------------------------------------------------------------------- planning
def default_out(recipe: Recipe) -> Path:
    runs = recipe.path.parent / "runs"
    return runs / recipe.name if recipe.scale == "small" else runs / recipe.scale / recipe.name


def _expected(recipe: Recipe, command: str, options: dict, evaluated: int = 0) -> float:
    """Seconds a step is expected to take, from rates measured on a 2-core CPU (base.yaml)."""
    rates = recipe.expected_seconds
    if command in RL_COMMANDS:
        config, _ = pipeline.build_step(command, options)
        learning_judge = getattr(config, "no_behavior", False) or (getattr(config, "disc_steps", 0) or 0) > 0
        return (rates.get("rl_per_response", 0.0) * config.iterations * config.prompts_per_iteration
                * config.rollouts * (config.max_new_tokens / 48) * (rates.get("learning_judge_factor", 1.0)
                                                                    if learning_judge else 1.0))
    if command == "evaluate":  # the rate is of make demo's evaluation: 130 queries, 4 sampled answers and 1 greedy
        config, _ = pipeline.build_step(command, options)
        queries = 246 / 130 if config.query_set == "every-held-out" else 1.0  # on the default logs
        return rates.get("evaluate_per_policy", 0.0) * evaluated * queries * (config.samples + 1) / 5
    if options.get("backbone") == "minilm" and not options.get("freeze_backbone"):
        # a 22M-parameter pretrained encoder trained instead of the SFT body (frozen, it is read once: no slower)
        return rates.get(command, 0.0) * rates.get("minilm_judge_factor", 1.0)
    return rates.get(command, 0.0)


def plan(recipe: Recipe, out: Path) -> tuple[Path, list[Step]]:
    """(base run dir, every step in order): the base stages, then each seed's arms, the evaluation, the report."""
    base_dir = out.parent / recipe.base_name
    steps = [Step(base_dir, c, c, o, expected_seconds=_expected(recipe, c, o)) for c, o in recipe.base_stages.items()]
    names = []
    for seed in recipe.seeds:
        for arm in recipe.arms:
            options = arm_options(recipe, arm, seed)
            name = stage_name(arm.name, seed)
            names.append(name)
            steps.append(Step(out, arm.command, name, options, arm.name, seed, _expected(recipe, arm.command, options)))
    if recipe.evaluate is not None:
        baseline = recipe.evaluate.get("baseline", "train-sft")
        options = {**recipe.evaluate, "baseline": baseline, "policies": [baseline, *names]}
        steps.append(Step(out, "evaluate", "evaluate", options,
                          expected_seconds=_expected(recipe, "evaluate", options, len(names) + 1)))
        steps.append(Step(out, "report", "report", {"run_dirs": [out]}, expected_seconds=_expected(recipe, "report", {})))
    return base_dir, steps


def step_done(step: Step) -> bool:
    if step.command == "report":
        return False
    state, manifest, _ = rundir.stage_state(step.run_dir / step.stage_name)
    if state != "done" or manifest is None:
        return False
    config, _ = pipeline.build_step(step.command, step.options, step.run_dir)
    from rlhb_cli.config import same_config
    if step.command == "prepare-behaviors" and config.logs is None:
        config.logs = step.run_dir / "simulate-logs" / "logs.jsonl"
    return same_config(manifest.get("config"), config)


def expected_pending(steps: list[Step], force: bool = False) -> list[Step]:
    """The steps that will run: those not done, and every one after a base stage or an arm that will rerun
    (its inputs change, so it goes stale)."""
    pending: list[Step] = []
    for step in steps:
        rerun_upstream = any(p.arm is None and p.command not in ("evaluate", "report") for p in pending) or \
            (step.command in ("evaluate", "report") and pending)
        if force or rerun_upstream or not step_done(step):
            pending.append(step)
    return pending


def link_base(base_dir: Path, out: Path, stages: list[str]) -> None:
    """Make each base stage visible in the experiment's run dir as a relative symbolic link."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        link = out / stage
        target = Path(os.path.relpath(base_dir / stage, out))
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            raise RlhbError(f"{link} is a stage of its own, not the base's; remove it or choose another --out")
        link.symlink_to(target, target_is_directory=True)


# ---------------------------------------------------------------------------------------------- running
def run_recipe(recipe: Recipe, out: Path | None = None, force: bool = False,
               say: Callable[[str], None] = print) -> dict:
    """Run whatever of the recipe is not done yet, then write results.md / results.json / plots into OUT."""
    out = Path(out or default_out(recipe))
    base_dir, steps = plan(recipe, out)
    pending = expected_pending(steps, force)
    expected = sum(s.expected_seconds for s in pending)
    say(f"{recipe.name} at scale {recipe.scale}: {len(steps)} stages, {len(steps) - len(pending)} already done; "
        f"expected about {expected / 60:.1f} min for the rest (rates measured on a 2-core CPU).")
    started = time.perf_counter()
    link_base(base_dir, out, list(recipe.base_stages))  # links to stages the base may still have to train
    for i, step in enumerate(steps, 1):
        if not force and step_done(step):  # asked now: a rerun upstream makes the stages after it stale
            continue
        say(f"[{i}/{len(steps)}] {step.stage_name} ({step.command}) in {step.run_dir}; "
            f"{(time.perf_counter() - started) / 60:.1f} min so far")
        step_started = time.perf_counter()
        pipeline.run_step(step.run_dir, step.command, step.options, step.stage_name,
                          force=force and step.command != "report")
        expected -= step.expected_seconds
        say(f"    done in {time.perf_counter() - step_started:.0f} s; about {max(expected, 0) / 60:.1f} min left")
    results = collect_results(recipe, out, base_dir)
    results["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    write_results(recipe, out, results)
    return results


# ---------------------------------------------------------------------------------------------- results
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
    if evaluation and name in evaluation["scores"]:
        gold = evaluation["scores"][name]
        sampled, greedy = gold.get("sampled", {}).get("gold", {}), gold.get("greedy", {}).get("gold", {})
        figures["gold_gain"] = sampled.get("gain_over_baseline", {}).get("mean")
        figures["gold_gain_greedy"] = greedy.get("gain_over_baseline", {}).get("mean")
        wtl = sampled.get("win_tie_loss")
        figures["win_minus_loss"] = wtl["win"] - wtl["loss"] if wtl else None
    return figures, rows


def collect_results(recipe: Recipe, out: Path, base_dir: Path) -> dict:
    evaluation = None
    if recipe.evaluate is not None:
        evaluation = rundir.read_json(out / "evaluate" / "summary_detail.json")
    per_run: dict[str, dict[int, dict]] = {}
    curves: dict[str, list[list[dict]]] = {}
    for arm in recipe.arms:
        for seed in recipe.seeds:
            figures, rows = run_figures(out, stage_name(arm.name, seed), evaluation)
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
    baseline = None
    if evaluation is not None:
        base_name = recipe.evaluate.get("baseline", "train-sft")
        baseline = {d: evaluation["scores"][base_name][d]["gold"] for d in evaluation["scores"][base_name]}
    return {"recipe": str(recipe.path), "base": str(recipe.base_path), "scale": recipe.scale, "seeds": recipe.seeds,
            "run_dir": str(out), "base_run_dir": str(base_dir), "git_commit": rundir.git_commit(),
            "versions": rundir.library_versions(), "arms": arms, "per_run": per_run, "claims": claims,
            "baseline_gold": baseline, "curves": {a: [[{k: r.get(k) for k in CURVE_KEYS if k in r} | {"step": r.get("step")}
                                                     for r in rows] for rows in runs] for a, runs in curves.items()}}


def judge_claim(claim: Claim, per_run: dict, arms: dict, seeds: list[int]) -> dict:
    """The verdict on one claim by its rule: reproduced, not reproduced, or direction only (within the noise)."""
    check, metric = claim.check, claim.check["metric"]

    def values(arm: str) -> list[float] | None:
        got = [per_run[arm][s].get(metric) for s in seeds]
        return None if any(v is None for v in got) else [float(v) for v in got]

    def summary(arm: str) -> dict | None:
        return arms[arm].get(metric)

    def diff(a: str, b: str) -> dict | None:
        va, vb = values(a), values(b)
        return across_runs([x - y for x, y in zip(va, vb)]) if va and vb else None

    def above(entry: dict | None) -> bool:
        return bool(entry and entry.get("ci95") and entry["ci95"][0] > 0)

    def below(entry: dict | None) -> bool:
        return bool(entry and entry.get("ci95") and entry["ci95"][1] < 0)

    def fmt(entry: dict | None) -> str:
        if not entry:
            return "n/a"
        ci = entry.get("ci95")
        return f"{entry['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")

    kind = check["kind"]
    verdict, evidence = "not reproduced", ""
    if kind == "close_to":
        arm, to, share = check["arm"], check["to"], float(check["share"])
        a, b = summary(arm), summary(to)
        if a is None or b is None:
            verdict, evidence = "not measured", f"{metric} missing"
        else:
            ratio = a["mean"] / b["mean"] if b["mean"] > 0 else float("nan")
            evidence = (f"{arm} {fmt(a)} vs {to} {fmt(b)}: {ratio:.0%} of it (needs {share:.0%}, interval above 0)"
                        if math.isfinite(ratio) else f"{arm} {fmt(a)} vs {to} {fmt(b)} (no gain to compare with)")
            if a["mean"] >= share * b["mean"] and above(a):
                verdict = "reproduced"
            elif a["mean"] >= share * b["mean"] and a["mean"] > 0:
                verdict = "direction only"
    elif kind == "better":
        arm, than = check["arm"], check["than"]
        d = diff(arm, than)
        evidence = f"{arm} - {than} per seed: {fmt(d)} ({arm} {fmt(summary(arm))}, {than} {fmt(summary(than))})"
        verdict = "not measured" if d is None else "reproduced" if above(d) else \
            "contradicted" if below(d) else "direction only" if d["mean"] > 0 else "not reproduced"
    elif kind == "decreasing":
        names = list(check["arms"])
        means = [summary(a) for a in names]
        if any(m is None for m in means):
            verdict, evidence = "not measured", f"{metric} missing"
        else:
            falling = all(x["mean"] > y["mean"] for x, y in zip(means, means[1:]))
            d = diff(names[0], names[-1])
            evidence = " > ".join(f"{a} {m['mean']:.4f}" for a, m in zip(names, means)) + \
                f"; {names[0]} - {names[-1]} per seed: {fmt(d)}"
            verdict = "reproduced" if falling and above(d) else "direction only" if falling else "not reproduced"
    elif kind == "similar":
        arm, to, within = check["arm"], check["to"], float(check["within"])
        d = diff(arm, to)
        evidence = f"{arm} - {to} per seed: {fmt(d)} (similar: interval around 0 and |mean| <= {within})"
        if d is None:
            verdict = "not measured"
        elif not above(d) and not below(d) and abs(d["mean"]) <= within:
            verdict = "reproduced"
    elif kind == "reaches":
        arm, at_least = check["arm"], float(check["at_least"])
        a = summary(arm)
        others = {name: entry.get(metric) for name, entry in arms.items() if name != arm}
        evidence = f"{arm} {fmt(a)} (needs >= {at_least}); " + ", ".join(f"{n} {fmt(e)}" for n, e in others.items())
        if a is None:
            verdict = "not measured"
        elif a["mean"] >= at_least and all(e is not None and e["mean"] < at_least for e in others.values()):
            verdict = "reproduced"
    return {"claim": claim.claim, "paper": claim.paper, "rule": CHECK_KINDS[kind], "metric": metric,
            "verdict": verdict, "evidence": evidence}


CURVE_KEYS = ("objective/reward_mean", "objective/return_mean", "objective/kl", "disc/score_generated",
              "disc/score_real")
CURVE_TITLES = {"objective/reward_mean": "reward (its own source)", "objective/return_mean": "mean return",
                "objective/kl": "KL to reference", "disc/score_generated": "D(real) on generated",
                "disc/score_real": "D(real) on logged"}


def draw_arm_curves(curves: dict[str, list[list[dict]]], out: Path) -> bool:
    """One panel per training figure: each arm's mean over seeds (thick) and its seeds (thin)."""
    import matplotlib
    matplotlib.use("Agg")
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
    import matplotlib
    matplotlib.use("Agg")
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
              "base, i.e. the simulated logs, SFT policy and judges, is trained once).", ""]
    if recipe.notes:
        lines += [recipe.notes, ""]
    lines += ["## Claims", "", "| claim | the paper | our rule | ours | verdict |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['paper']} | {c['rule']} ({c['metric']}) | {c['evidence']} | "
                     f"**{c['verdict']}** |")
    shown = [m for m in ("gold_gain", "gold_gain_greedy", "win_minus_loss", "reward_final", "return_curve_sd",
                         "disc_score_generated_final", "kl_final", "seconds")
             if any(m in a for a in results["arms"].values())]
    lines += ["", "## Arms", "", "| arm | stage | options | " + " | ".join(shown) + " |",
              "|---|---|---|" + "---|" * len(shown)]
    for name, arm in results["arms"].items():
        options = ", ".join(f"{k}={v}" for k, v in arm["options"].items()) or "defaults"
        lines.append(f"| {name} | {arm['stage']} | {options} | " + " | ".join(
            _seconds(arm.get(m)) if m == "seconds" else _cell(arm.get(m)) for m in shown) + " |")
    lines += ["", "What the columns are: " + "; ".join(f"{m}: {METRICS[m]}" for m in shown) + ".", ""]
    if results.get("baseline_gold"):
        lines += ["SFT baseline's gold score: " + ", ".join(f"{d} {_cell(e)}" for d, e in
                                                            results["baseline_gold"].items()) +
                  " (mean over queries, bootstrap interval).", ""]
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
    if recipe.evaluate is not None:
        lines += ["", "Per-run detail (judges' trust, behaviour following, sample answers): "
                  "[report/report.md](report/report.md).", ""]
    rundir.atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    rundir.atomic_write_json(out / "results.json", results)
