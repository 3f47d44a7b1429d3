"""Running stages by name in this process: what the CLI, `rlhb run-all` and the experiment runner share.

Every stage is declared in `registry.STAGES` with its config class and the function that runs it;
`run_step` builds the config from a mapping of options and runs the stage into a run directory, skipped
when the manifest says it is already done with the same config and fresh inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from rlhb_cli import distributed, registry, rundir, storage
from rlhb_cli.behaviors.prepare import SIMULATED_LOGS
from rlhb_cli.config import build_config, same_config
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.card import write_stage_cards
from rlhb_cli.models.load import load_tokenizer

console = Console()


def run_stage(stage: str, stage_dir: Path, config: Any, body: Callable, seed: int | None = None,
              upstream: tuple[str, ...] = (), force: bool = False, resume: bool = False,
              stop_after_steps: int | None = None, command: str | None = None,
              report_to: tuple[str, ...] = ()) -> dict:
    """Skip when already done with this config and fresh inputs; else run `body(config, stage_run)`.
    The stage's lock is held from the check to the end, so two writers never interleave. `report_to` (experiment
    trackers) is not part of the config: where a run's figures are also shown does not change them."""
    with storage.stage_lock(stage_dir, what=f"{stage} in {stage_dir.parent}"):
        state, manifest, _ = rundir.stage_state(stage_dir)
        if state == "done" and not force and manifest and same_config(manifest.get("config"), config):
            summary = rundir.read_json(stage_dir / rundir.SUMMARY)
            console.print(f"{stage}: already done in {stage_dir} with this config (--force to run again)")
            return summary
        with rundir.open_stage(stage_dir, stage, config, seed, command=command) as stage_run:
            stage_run.resume = resume
            stage_run.stop_after_steps = stop_after_steps
            stage_run.report_to = tuple(report_to)
            if not resume:
                rundir.discard_resume_points(stage_dir)
            for name in upstream:
                stage_run.add_upstream(name)
            summary = body(config, stage_run)
            stage_run.set_summary(summary)
            if distributed.is_main_process():
                write_stage_cards(stage_dir, lambda folder: load_tokenizer(folder, []))
    return summary


def build_step(command: str, options: dict[str, Any], run_dir: Path | None = None) -> tuple[Any, str]:
    """(config, stage folder name) of one plan step; bad options end in an RlhbError naming them."""
    options = dict(options or {})
    spec = registry.STAGES.get(command)
    if spec is None or spec.made_by:
        raise RlhbError(f"unknown stage {command!r}; stages: {', '.join(registry.commands())}")
    if command == "report" and "run_dirs" not in options:  # the report of the run it is a step of
        options["run_dirs"] = [run_dir or Path(".")]
    try:
        config = build_config(registry.config_class(command), None, options)
    except ValueError as exc:
        raise RlhbError(str(exc)) from None
    return config, spec.folder_for(config)


def default_inputs(command: str, config: Any, run_dir: Path, check: bool = True) -> tuple[str, ...]:
    """Fill the inputs a stage takes from the run dir when none is given, and return the stages they come
    from: prepare-behaviors reads the simulated logs (of its --from-stage) unless given a log file. With
    `check`, the stage they come from must be done."""
    if command == "prepare-behaviors" and config.logs is None:
        source = config.from_stage
        simulated = rundir.require_stage(run_dir, source) if check else Path(run_dir) / source
        config.logs = simulated / SIMULATED_LOGS[source]
        return (source,)
    return ()


def run_step(run_dir: Path, command: str, options: dict[str, Any], stage_name: str | None = None,
             force: bool = False, resume: bool = False, stop_after_steps: int | None = None,
             config: Any = None, report_to: tuple[str, ...] = ()) -> tuple[str, dict]:
    """Run stage `command` with `options` (or a built `config`) into RUN_DIR/STAGE_NAME (default: the
    folder the config picks)."""
    if config is None:
        config, default_name = build_step(command, options, run_dir)
    else:
        default_name = registry.STAGES[command].folder_for(config)
    name = stage_name or default_name
    if "/" in name or name.startswith("."):
        raise RlhbError(f"--stage-name {name!r}: give a plain folder name")
    upstream = default_inputs(command, config, run_dir)
    spec = registry.STAGES[command]
    try:
        summary = run_stage(name, Path(run_dir) / name, config, registry.runner(command), getattr(config, "seed", None),
                            upstream, force or spec.always_rerun, resume, stop_after_steps, command, report_to)
    except ValueError as exc:
        raise RlhbError(str(exc)) from None
    return name, summary
