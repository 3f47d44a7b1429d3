"""The `rlhb` command line: one subcommand per pipeline stage, each a thin layer over a library module.

A command turns its options into the stage's config dataclass (defaults < --config YAML < flags),
checks the run directory, runs the stage, and prints its headline figures. A user's mistake ends in
one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub or transformers (the stage modules below do), which read
# them once, at import: the command line never reaches for a hub, and its own output says what loaded.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our own summaries say what loaded and how
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local paths; never reach for a hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress bars show what is running

import dataclasses
import inspect
import json
import sys
import time
import types
import typing
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhb_cli import pipeline, registry, rundir, storage
from rlhb_cli.behaviors import importers, prepare
from rlhb_cli.behaviors.prepare import PrepareConfig
from rlhb_cli.config import FlatField, build_config, flat_fields, help_of
from rlhb_cli.errors import RlhbError
from rlhb_cli.evaluation import report as report_stage
from rlhb_cli.experiments import plan as recipe_plan
from rlhb_cli.experiments.recipe import load_recipe
from rlhb_cli.models.export import export_policy
from rlhb_cli.pipeline import run_stage
from rlhb_cli.simulator import simulate
from rlhb_cli.simulator.simulate import SimulateConfig
from rlhb_cli.trackers import parse_report_to

app = typer.Typer(
    no_args_is_help=True,
    help="RLHB: align language models with real online human behaviour (arXiv 2405.00578), and its baselines.\n\n"
         "Pipeline: simulate-logs or import -> prepare-behaviors -> ... ; every stage reads and writes a run directory.",
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"rlhb {package_version('rlhb-cli')}")
        raise typer.Exit()


import_app = typer.Typer(no_args_is_help=True, help="Real public behaviour data into the log format.")
app.add_typer(import_app, name="import", help="Import real behaviour data (Stack Exchange, OpenAssistant) as logs.")
console = Console()
err_console = Console(stderr=True)

RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory; the stage writes RUN_DIR/<stage>/.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML recipe filling the stage's config; flags override it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run again even if this stage is done with the same config.")]
ReportToOpt = Annotated[Optional[str], typer.Option("--report-to", help="Also show the training stages' metrics in "
                        "tensorboard, wandb and/or trackio (comma-separated; default none).")]


def _opt(config_cls: type, name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=help_of(config_cls, name), show_default=False)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [..] is text
    raise typer.Exit(2)


def _print_summary(title: str, summary: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in summary.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
        table.add_row(key, shown)
    console.print(table)


def _guard(fn: Callable[[], None]) -> None:
    try:
        fn()
    except RlhbError as exc:
        _fail(str(exc))
    except Exception as exc:  # a full disk, a read-only run dir: one line, the stage is left failed, not done
        message = storage.disk_error_message(exc)
        if message is None:
            raise
        _fail(message)


@app.callback()
def _global(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of errors.")] = False,
            version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                  help="Print rlhb's version and exit.")] = False) -> None:
    """Global options."""
    if verbose:
        app.pretty_exceptions_enable = True


# ------------------------------------------------------------------------------------------- stages
@app.command("simulate-logs", help=registry.STAGES["simulate-logs"].summary)
def simulate_logs(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write logs.jsonl, preferences.jsonl, environment.json here.")] = None,
    run_dir: RunDirOpt = None,
    config_file: ConfigOpt = None,
    seed: Annotated[Optional[int], _opt(SimulateConfig, "seed", "--seed")] = None,
    queries: Annotated[Optional[int], _opt(SimulateConfig, "queries", "--queries")] = None,
    eval_queries: Annotated[Optional[int], _opt(SimulateConfig, "eval_queries", "--eval-queries")] = None,
    candidates: Annotated[Optional[int], _opt(SimulateConfig, "candidates", "--candidates")] = None,
    windows: Annotated[Optional[int], _opt(SimulateConfig, "windows", "--windows")] = None,
    impressions: Annotated[Optional[int], _opt(SimulateConfig, "impressions", "--impressions")] = None,
    events: Annotated[Optional[bool], _opt(SimulateConfig, "events", "--events/--aggregated")] = None,
    pairs_per_query: Annotated[Optional[int], _opt(SimulateConfig, "pairs_per_query", "--pairs-per-query")] = None,
    sealed_facts: Annotated[Optional[int], _opt(SimulateConfig, "sealed_facts", "--sealed-facts")] = None,
    force: ForceOpt = False,
) -> None:
    def body() -> None:
        if (out is None) == (run_dir is None):
            raise RlhbError("give exactly one of --out DIR or --run-dir DIR")
        stage_dir = out if out is not None else run_dir / simulate.STAGE
        config = build_config(SimulateConfig, config_file, dict(
            seed=seed, queries=queries, eval_queries=eval_queries, candidates=candidates, windows=windows,
            impressions=impressions, events=events, pairs_per_query=pairs_per_query, sealed_facts=sealed_facts))
        try:
            summary = run_stage(simulate.STAGE, stage_dir, config, simulate.run, config.seed, force=force)
        except ValueError as exc:
            raise RlhbError(str(exc)) from None
        _print_summary(f"simulate-logs -> {stage_dir}", summary)
    _guard(body)


@app.command("prepare-behaviors", help=registry.STAGES["prepare-behaviors"].summary)
def prepare_behaviors(
    logs: Annotated[Optional[Path], typer.Argument(help=help_of(PrepareConfig, "logs"), show_default=False)] = None,
    run_dir: RunDirOpt = None,
    config_file: ConfigOpt = None,
    field_map: Annotated[Optional[list[str]], _opt(PrepareConfig, "field_map", "--field")] = None,
    input_kind: Annotated[Optional[str], _opt(PrepareConfig, "input_kind", "--input-kind")] = None,
    behavior_basis: Annotated[Optional[str], _opt(PrepareConfig, "behavior_basis", "--behavior-basis")] = None,
    bins: Annotated[Optional[int], _opt(PrepareConfig, "bins", "--bins")] = None,
    bins_from: Annotated[Optional[Path], _opt(PrepareConfig, "bins_from", "--bins-from")] = None,
    template: Annotated[Optional[str], _opt(PrepareConfig, "template", "--template")] = None,
    max_reject_ratio: Annotated[Optional[float], _opt(PrepareConfig, "max_reject_ratio", "--max-reject-ratio")] = None,
    max_count: Annotated[Optional[float], _opt(PrepareConfig, "max_count", "--max-count")] = None,
    require_view: Annotated[Optional[bool], _opt(PrepareConfig, "require_view", "--require-view/--no-require-view")] = None,
    keep_fields: Annotated[Optional[list[str]], _opt(PrepareConfig, "keep_fields", "--keep-field")] = None,
    absent_as_zero: Annotated[Optional[list[str]], _opt(PrepareConfig, "absent_as_zero", "--absent-as-zero")] = None,
    validation_fraction: Annotated[Optional[float], _opt(PrepareConfig, "validation_fraction", "--validation-fraction")] = None,
    test_fraction: Annotated[Optional[float], _opt(PrepareConfig, "test_fraction", "--test-fraction")] = None,
    seed: Annotated[Optional[int], _opt(PrepareConfig, "seed", "--seed")] = None,
    salt: Annotated[Optional[str], _opt(PrepareConfig, "salt", "--salt")] = None,
    from_stage: Annotated[Optional[str], _opt(PrepareConfig, "from_stage", "--from-stage")] = None,
    group_field: Annotated[Optional[str], _opt(PrepareConfig, "group_field", "--group-field")] = None,
    force: ForceOpt = False,
) -> None:
    def body() -> None:
        if run_dir is None:
            raise RlhbError("--run-dir DIR is required")
        config = build_config(PrepareConfig, config_file, dict(
            logs=logs, field_map=field_map or None, input_kind=input_kind, behavior_basis=behavior_basis, bins=bins,
            bins_from=bins_from, template=template, max_reject_ratio=max_reject_ratio, max_count=max_count,
            require_view=require_view, keep_fields=keep_fields or None, absent_as_zero=absent_as_zero or None,
            validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed, salt=salt,
            from_stage=from_stage, group_field=group_field))
        upstream = pipeline.default_inputs(prepare.STAGE, config, run_dir)
        summary = run_stage(prepare.STAGE, run_dir / prepare.STAGE, config, prepare.run, config.seed, upstream, force)
        _print_summary(f"prepare-behaviors -> {run_dir / prepare.STAGE}", summary)
        for warning in summary.get("warnings", []):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    _guard(body)


def _import(kind: str, source, out: Path, pairs: Optional[Path], min_views: int = 0, since: str | None = None) -> None:
    counts, rejects, rejected = importers.import_logs(kind, source, out, pairs, min_views, since)
    _print_summary(f"import {kind} -> {out}", counts | ({"pairs_file": str(pairs)} if pairs else {})
                   | ({"rejects_file": str(rejects)} if rejected else {}))


@import_app.command("stackexchange")
def import_stackexchange(
    dumps: Annotated[list[Path], typer.Argument(help="Folders of Stack Exchange dumps (Posts.xml, Votes.xml, "
                                                "Comments.xml), one site each; a row's `site` says which.")],
    out: Annotated[Path, typer.Option("--out", help="Log file to write (JSONL), one row per answer.")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="Also write preference pairs: answers of one question by score.")] = None,
    min_views: Annotated[int, typer.Option("--min-views", help="Leave out answers to questions seen fewer times (counted).")] = 0,
    since: Annotated[Optional[str], typer.Option("--since", help="Leave out answers written before this date, "
                                                 "YYYY-MM-DD (counted).")] = None,
) -> None:
    """Stack Exchange dumps -> behaviour logs: views, upvotes, downvotes, comments per answer."""
    _guard(lambda: _import("stackexchange", dumps, out, pairs, min_views, since))


@import_app.command("oasst")
def import_oasst(
    trees: Annotated[Path, typer.Argument(help="OpenAssistant trees (JSONL, one tree or root message a line) or flat messages (one a line, each naming its parent_id).")],
    out: Annotated[Path, typer.Option("--out", help="Log file to write (JSONL), one row per assistant reply.")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="Also write preference pairs: sibling replies by rank.")] = None,
) -> None:
    """OpenAssistant trees or messages -> behaviour logs: +1 / -1 reactions per assistant reply."""
    _guard(lambda: _import("oasst", trees, out, pairs))


# ------------------------------------------------------------------------------------------- training stages
def _config_option(f: FlatField) -> tuple[Any, Any]:
    """(annotation, default) of the CLI option for one config setting; the help is the field's own."""
    flag = "--" + f.name.replace("_", "-")
    kind = f.annotation
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
    if base is bool:
        return Annotated[Optional[bool], typer.Option(f"{flag}/--no-{flag[2:]}", help=f.help, show_default=False)], None
    if typing.get_origin(base) is list:
        return Annotated[Optional[list[str]], typer.Option(flag, help=f.help, show_default=False)], None
    shown = f" (default: {f.default})" if f.default is not dataclasses.MISSING else ""
    return Annotated[Optional[base], typer.Option(flag, help=f.help + shown, show_default=False)], None


def stage_command(name: str) -> None:
    """Register `rlhb NAME` from the registry: run dir and control flags, then one option per field of the
    stage's config. A renamable stage takes --stage-name, so e.g. RLHB on top of RLHF can sit beside RLHB
    from SFT; the folder is otherwise the one the config picks (train-rlhb --no-behavior: train-rlgaf)."""
    spec = registry.STAGES[name]
    config_cls = registry.config_class(name)
    fields = flat_fields(config_cls).values()
    parameters = [
        inspect.Parameter("run_dir", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[Path, typer.Option("--run-dir", help="Run directory.")]),
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
        inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=ForceOpt),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--resume", help="Continue from this stage's last checkpoint.")]),
        inspect.Parameter("report_to", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ReportToOpt),
        inspect.Parameter("stop_after_steps", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[int], typer.Option("--stop-after-steps", help="Stop after this many optimizer steps in all, "
                                        "with a checkpoint; continue later with --resume.")]),
    ]
    if spec.renamable:
        parameters.append(inspect.Parameter("stage_name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[str], typer.Option("--stage-name", help="Write into RUN_DIR/STAGE_NAME instead of the default "
                                        "(e.g. train-rlhb-on-rlhf beside train-rlhb).")]))
    for f in fields:
        annotation, default = _config_option(f)
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))

    def command(**values: Any) -> None:
        def body() -> None:
            run_dir = values["run_dir"]
            config = build_config(config_cls, values["config_file"], {f.name: values[f.name] for f in fields})
            report_to = parse_report_to(values["report_to"])
            stage_name = values.get("stage_name") or spec.folder_for(config)
            if values["resume"] and rundir.stage_state(run_dir / stage_name)[0] == "done":
                console.print(f"{stage_name}: already done; nothing to resume")
                return
            try:
                _, summary = pipeline.run_step(run_dir, name, {}, stage_name, force=values["force"] or values["resume"],
                                               resume=values["resume"], stop_after_steps=values["stop_after_steps"],
                                               config=config, report_to=report_to)
            except rundir.StageStopped as exc:
                console.print(f"{stage_name}: {exc}; continue with the same command and --resume")
                return
            _print_summary(f"{stage_name} -> {run_dir / stage_name}", summary)
        _guard(body)

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = spec.summary
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


for _name in registry.commands():
    if _name not in ("simulate-logs", "prepare-behaviors", "report"):  # their own commands, above and below
        stage_command(_name)


def _run_all(run_dir: Path, plan: dict[str, dict], force: bool, report_to: tuple[str, ...]) -> None:
    """Each stage of `plan` in order, in this one process (one import of torch and friends, not one a stage)."""
    started = time.perf_counter()
    for command, options in plan.items():
        try:
            name, summary = pipeline.run_step(run_dir, command, options or {}, force=force, report_to=report_to)
        except RlhbError as exc:
            raise RlhbError(f"run-all: {exc}") from None
        headline = registry.STAGES[command].headline if command in registry.STAGES else ()
        shown = {k: v for k, v in summary.items() if k in headline} or summary
        _print_summary(f"{command} -> {run_dir / name}", shown)
        for line in summary.get("verdict", []):
            console.print(line)
    console.print(f"run-all: {len(plan)} stages in {time.perf_counter() - started:.0f} s; "
                  f"`rlhb status --run-dir {run_dir}` lists them")


@app.command("run-all")
def run_all(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory.")],
    plan_file: Annotated[Optional[Path], typer.Option("--config", help="YAML: stage name -> its options, in the order "
                                                      "to run (default: the whole pipeline at its defaults).")] = None,
    force: ForceOpt = False,
    report_to: ReportToOpt = None,
) -> None:
    """Run the pipeline (or a YAML plan of stages with their options) in one process; done stages are skipped."""
    def body() -> None:
        trackers = parse_report_to(report_to)
        plan: dict[str, dict] = {name: {} for name in registry.DEFAULT_PLAN}
        if plan_file is not None:
            try:
                loaded = yaml.safe_load(plan_file.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise RlhbError(f"{plan_file}: no such file") from None
            except yaml.YAMLError as exc:
                raise RlhbError(f"{plan_file}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
            if not isinstance(loaded, dict) or not all(isinstance(v, (dict, type(None))) for v in loaded.values()):
                raise RlhbError(f"{plan_file}: a plan maps stage names to mappings of their options")
            plan = loaded
        try:
            _run_all(run_dir, plan, force, trackers)
        except ValueError as exc:
            raise RlhbError(str(exc)) from None
    _guard(body)


@app.command("report", help=registry.STAGES["report"].summary)
def report(
    run_dirs: Annotated[list[Path], typer.Option("--run-dir", help="Run dir with an evaluation; repeat it to "
                                                 "aggregate several (e.g. seeds).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Where report.md and its plots go (default: "
                                                "FIRST_RUN_DIR/report).")] = None,
    rolling: Annotated[Optional[int], typer.Option("--rolling", help="Iterations in the curves' rolling mean (5).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Queries with answers side by side (4).")] = None,
) -> None:
    def body() -> None:
        config = build_config(report_stage.ReportConfig, None, dict(run_dirs=run_dirs, rolling=rolling,
                                                                    samples=samples))
        target = out or run_dirs[0] / report_stage.STAGE
        summary = run_stage(report_stage.STAGE, target, config, report_stage.run, force=True)
        for line in summary["verdict"]:
            console.print(line)
        console.print(f"report: {summary['report']}", soft_wrap=True, highlight=False)
    _guard(body)


experiment_app = typer.Typer(no_args_is_help=True, help="Paper claims as recipes (experiments/*.yaml).")
app.add_typer(experiment_app, name="experiment", help="Run a recipe's grid of arms and seeds and judge its claims "
              "(experiments/README.md).")
RecipeArg = Annotated[Path, typer.Argument(help="The recipe, e.g. experiments/paper-q1.yaml.", show_default=False)]
ScaleOpt = Annotated[str, typer.Option("--scale", help="small (the default: each recipe within about 30 min on "
                                       "2 CPU cores) or tiny (every recipe in about a minute: a smoke test).")]


@experiment_app.command("run")
def experiment_run(
    recipe_path: RecipeArg,
    scale: ScaleOpt = "small",
    out: Annotated[Optional[Path], typer.Option("--out", help="The experiment's run dir (default: "
                                                "experiments/runs/[SCALE/]NAME beside the recipe); its base "
                                                "stages go to OUT/../base.")]= None,
    force: ForceOpt = False,
    report_to: ReportToOpt = None,
) -> None:
    """Run what is not done yet of a recipe, then write results.md: each claim with the rule that judged it."""
    def body() -> None:
        recipe = load_recipe(recipe_path, scale)
        results = recipe_plan.run_recipe(recipe, out, force, say=lambda m: console.print(m, highlight=False),
                                         report_to=parse_report_to(report_to))
        for claim in results["claims"]:
            console.print(f"[bold]{claim['verdict']}[/]: {claim['claim']} ({claim['evidence']})", highlight=False)
        console.print(f"results: {Path(results['run_dir']) / 'results.md'}", soft_wrap=True, highlight=False)
    _guard(body)


@experiment_app.command("plan")
def experiment_plan(recipe_path: RecipeArg, scale: ScaleOpt = "small",
                    out: Annotated[Optional[Path], typer.Option("--out", help="As for `run`.")] = None) -> None:
    """Check a recipe and list its stages, what is done, and the expected time of the rest; runs nothing."""
    def body() -> None:
        recipe = load_recipe(recipe_path, scale)
        target = out or recipe_plan.default_out(recipe)
        _, steps = recipe_plan.plan(recipe, target)
        table = Table(title=f"{recipe.name} at scale {scale} -> {target}", title_justify="left")
        for column in ("stage", "command", "run dir", "state", "expected"):
            table.add_column(column, overflow="fold")
        left = 0.0
        pending = recipe_plan.expected_pending(steps)
        for step in steps:
            done = step not in pending
            left += 0.0 if done else step.expected_seconds
            table.add_row(step.stage_name, step.command, str(step.run_dir), "done" if done else "to run",
                          "" if done else f"{step.expected_seconds / 60:.1f} min")
        console.print(table)
        console.print(f"expected about {left / 60:.1f} min for what is left (rates measured on a 2-core CPU)")
    _guard(body)


@app.command("export")
def export(out: Annotated[Path, typer.Option("--out", help="New folder for the model (Hugging Face layout).")],
           run_dir: RunDirOpt = None,
           stage: Annotated[str, typer.Option("--stage", help="The stage whose policy/ to export.")] = "train-rlhb",
           policy: Annotated[Optional[Path], typer.Option("--policy", help="A policy folder instead of "
                                                          "RUN_DIR/STAGE/policy.")] = None) -> None:
    """A policy as a self-contained model directory (LoRA merged, tokenizer, generation config, model card)
    that `from_pretrained` loads without rlhb, ready for push_to_hub or a serving engine."""
    def body():
        if policy is None and run_dir is None:
            raise RlhbError("give --run-dir (with --stage) or --policy")
        source = policy or rundir.require_stage(run_dir, stage) / "policy"
        _print_summary(f"export -> {out}", export_policy(source, out))
    _guard(body)


@app.command("status")
def status(run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory to describe.")],
           verify: Annotated[bool, typer.Option("--verify", help="Re-hash every output, not only the files whose "
                                                "size or modification time changed.")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False) -> None:
    """Each stage of a run directory: done / failed / stale / damaged / missing, with its headline figures."""
    if as_json:  # for scripts: every row, nothing cut
        return typer.echo(json.dumps({"run_dir": str(run_dir), "stages": rundir.status_rows(run_dir, verify)}, default=str))
    table = Table(title=f"run {run_dir}", title_justify="left")
    for column in ("stage", "state", "finished (UTC)", "headline / detail"):
        table.add_column(column, overflow="fold")
    colours = {"done": "green", "failed": "red", "stale": "yellow", "interrupted": "red", "running": "cyan", "damaged": "red"}
    for row in rundir.status_rows(run_dir, verify):
        headline = "\n".join(f"{k}={v}" for k, v in list(row["headline"].items())[:6])
        detail = row["detail"] or headline
        colour = colours.get(row["state"], "dim")
        finished = (row["finished_at"] or "")[5:16].replace("T", " ")  # MM-DD HH:MM (UTC)
        table.add_row(row["stage"], f"[{colour}]{row['state']}[/]", finished, detail)
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
