"""Planning and running a recipe: its steps (the base's stages, each seed's arms, the evaluation, the
report), what is done already, how long the rest is expected to take, and running what is left."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhb_cli import pipeline, registry, rundir
from rlhb_cli.config import same_config
from rlhb_cli.errors import RlhbError
from rlhb_cli.experiments.recipe import SUITES, Recipe, arm_options, base_folder, base_stages, stage_name
from rlhb_cli.experiments.results import collect_results, write_results


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
    base: int = 0  # the base seed it belongs to


@dataclass
class Base:
    """One base of a recipe: its seed, the folder its stages train in, and the run dir of its arms and
    evaluation: base 0's is the experiment's own dir (so adding bases to a recipe keeps its runs), base B's
    OUT-bB beside it, as its stages' folder is BASE-bB beside the base's."""

    seed: int
    base_dir: Path
    run_dir: Path



def default_out(recipe: Recipe) -> Path:
    runs = recipe.path.parent / "runs"
    return runs / recipe.name if recipe.scale == "small" else runs / recipe.scale / recipe.name


def _expected(recipe: Recipe, command: str, options: dict, evaluated: int = 0) -> float:
    """Seconds a step is expected to take, from rates measured on a 2-core CPU (base.yaml)."""
    rates = recipe.expected_seconds
    if command in registry.ALIGNER_COMMANDS:  # a PPO run; train-dpo, an arm too, has its stage's rate
        config, _ = pipeline.build_step(command, options)
        learning_judge = getattr(config, "no_behavior", False) or (getattr(config, "disc_steps", 0) or 0) > 0
        return (rates.get("rl_per_response", 0.0) * config.iterations * config.prompts_per_iteration
                * config.rollouts * (config.max_new_tokens / 48) * (rates.get("learning_judge_factor", 1.0)
                                                                    if learning_judge else 1.0)
                * rates.get(f"{command} factor", 1.0))  # e.g. RLHF scoring on a MiniLM reward model
    if command == "evaluate-personalization":  # the rate is of one policy's conversations at the stage's defaults
        return rates.get("evaluate_personalization_per_policy", 0.0) * evaluated
    if command == "evaluate":  # the rate is of make demo's evaluation: 130 queries, 4 sampled answers and 1 greedy
        config, _ = pipeline.build_step(command, options)
        queries = 246 / 130 if config.query_set == "every-held-out" else 1.0  # on the default logs
        return rates.get("evaluate_per_policy", 0.0) * evaluated * queries * (config.samples + 1) / 5
    if options.get("backbone") == "minilm" and not options.get("freeze_backbone"):
        # a 22M-parameter pretrained encoder trained instead of the SFT body (frozen, it is read once: no slower);
        # a stage measured on it has its own rate ("train-reward on minilm")
        measured = rates.get(f"{command} on minilm")
        return measured if measured is not None else rates.get(command, 0.0) * rates.get("minilm_judge_factor", 1.0)
    return rates.get(command, 0.0)


def layout(recipe: Recipe, out: Path) -> list[Base]:
    """Where each of the recipe's bases trains and runs (see `Base`)."""
    return [Base(b, out.parent / base_folder(recipe, b), out.parent / f"{out.name}-b{b}" if b else out)
            for b in recipe.bases]


def plan(recipe: Recipe, out: Path) -> tuple[list[Base], list[Step]]:
    """(the bases, every step in order): per base, its stages, then each seed's arms, the evaluation, the report."""
    bases = layout(recipe, out)
    steps = []
    for base in bases:
        steps += _base_plan(recipe, base)
    return bases, steps


def _base_plan(recipe: Recipe, base: Base) -> list[Step]:
    out = base.run_dir
    steps = [Step(base.base_dir, c, c, o, expected_seconds=_expected(recipe, c, o), base=base.seed)
             for c, o in base_stages(recipe, base.seed).items()]
    names = []
    for seed in recipe.seeds:
        for arm in recipe.arms:
            options = arm_options(recipe, arm, seed)
            name = stage_name(arm.name, seed)
            names.append(name)
            steps.append(Step(out, arm.command, name, options, arm.name, seed, _expected(recipe, arm.command, options),
                              base=base.seed))
    if recipe.evaluate is not None:
        baseline = recipe.evaluate.get("baseline", "train-sft")
        references = recipe.evaluate.get("references", [])  # models beside the arms, e.g. the base model as it comes
        options = {k: v for k, v in recipe.evaluate.items() if k not in ("references", "baseline")} | {
            "policies": [baseline, *references, *names]}
        if recipe.evaluation == "evaluate":
            options["baseline"] = baseline
        steps.append(Step(out, recipe.evaluation, recipe.evaluation, options, expected_seconds=_expected(
            recipe, recipe.evaluation, options, len(names) + len(references) + 1), base=base.seed))
        if recipe.evaluation == "evaluate":  # the report reads evaluate's figures; the other suite's are in results.md
            steps.append(Step(out, "report", "report", {"run_dirs": [out]},
                              expected_seconds=_expected(recipe, "report", {}), base=base.seed))
    return steps


def step_done(step: Step) -> bool:
    if registry.STAGES[step.command].always_rerun:
        return False
    state, manifest, _ = rundir.stage_state(step.run_dir / step.stage_name)
    if state != "done" or manifest is None:
        return False
    config, _ = pipeline.build_step(step.command, step.options, step.run_dir)
    pipeline.default_inputs(step.command, config, step.run_dir, check=False)  # as run_step fills them
    return same_config(manifest.get("config"), config)


def expected_pending(steps: list[Step], force: bool = False) -> list[Step]:
    """The steps that will run: those not done, and every one after a base stage or an arm that will rerun
    (its inputs change, so it goes stale)."""
    pending: list[Step] = []
    for step in steps:
        judging = (*SUITES.values(), "report")
        upstream = [p for p in pending if p.base == step.base]  # bases share nothing
        rerun_upstream = any(p.arm is None and p.command not in judging for p in upstream) or \
            (step.command in judging and upstream)
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
               say: Callable[[str], None] = print, report_to: tuple[str, ...] = ()) -> dict:
    """Run whatever of the recipe is not done yet, then write results.md / results.json / plots into OUT."""
    out = Path(out or default_out(recipe))
    bases, steps = plan(recipe, out)
    pending = expected_pending(steps, force)
    expected = sum(s.expected_seconds for s in pending)
    say(f"{recipe.name} at scale {recipe.scale}: {len(steps)} stages, {len(steps) - len(pending)} already done; "
        f"expected about {expected / 60:.1f} min for the rest (rates measured on a 2-core CPU).")
    started = time.perf_counter()
    for base in bases:  # links to stages the base may still have to train
        link_base(base.base_dir, base.run_dir, list(recipe.base_stages))
    for i, step in enumerate(steps, 1):
        if not force and step_done(step):  # asked now: a rerun upstream makes the stages after it stale
            continue
        say(f"[{i}/{len(steps)}] {step.stage_name} ({step.command}) in {step.run_dir}; "
            f"{(time.perf_counter() - started) / 60:.1f} min so far")
        step_started = time.perf_counter()
        pipeline.run_step(step.run_dir, step.command, step.options, step.stage_name,
                          force=force and not registry.STAGES[step.command].always_rerun, report_to=report_to)
        expected -= step.expected_seconds
        say(f"    done in {time.perf_counter() - step_started:.0f} s; about {max(expected, 0) / 60:.1f} min left")
    results = collect_results(recipe, out, bases)
    results["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    write_results(recipe, out, results)
    return results


