"""Running stages by name in this process: what `rlhb run-all` and the experiment runner share.

Every stage that can run from a plan is registered here with its config class and the function that
runs it; `run_step` builds the config from a mapping of options and runs the stage into a run
directory, skipped when the manifest says it is already done with the same config and fresh inputs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from rlhb_cli import rundir
from rlhb_cli.config import build_config, same_config
from rlhb_cli.errors import RlhbError

console = Console()


@dataclass(frozen=True)
class StageRunner:
    """How to run one stage command: its config class, and `module.function(config, stage_run)`."""

    config_cls: type
    module: str
    function: str = "run"
    stage_of: Optional[Callable[[Any], str]] = None  # the folder, when the config picks it (RLGAF)


STAGE_RUNNERS: dict[str, StageRunner] = {}


def register(name: str, runner: StageRunner) -> None:
    STAGE_RUNNERS[name] = runner


def run_stage(stage: str, stage_dir: Path, config: Any, body: Callable, seed: int | None = None,
              upstream: tuple[str, ...] = (), force: bool = False, resume: bool = False,
              stop_after_steps: int | None = None) -> dict:
    """Skip when already done with this config and fresh inputs; else run `body(config, stage_run)`."""
    state, manifest, _ = rundir.stage_state(stage_dir)
    if state == "done" and not force and manifest and same_config(manifest.get("config"), config):
        summary = rundir.read_json(stage_dir / rundir.SUMMARY)
        console.print(f"{stage}: already done in {stage_dir} with this config (--force to run again)")
        return summary
    with rundir.open_stage(stage_dir, stage, config, seed) as stage_run:
        stage_run.resume = resume
        stage_run.stop_after_steps = stop_after_steps
        for name in upstream:
            stage_run.add_upstream(name)
        summary = body(config, stage_run)
        stage_run.set_summary(summary)
    return summary


def build_step(command: str, options: dict[str, Any], run_dir: Path | None = None) -> tuple[Any, str]:
    """(config, stage folder name) of one plan step; bad options end in an RlhbError naming them."""
    options = dict(options or {})
    if command == "report":
        from rlhb_cli.stages import report as report_stage
        return build_config(report_stage.ReportConfig, None, {"run_dirs": [run_dir or Path(".")], **options}), command
    if command not in STAGE_RUNNERS:
        raise RlhbError(f"unknown stage {command!r}; stages: {', '.join(STAGE_RUNNERS)}, report")
    runner = STAGE_RUNNERS[command]
    try:
        config = build_config(runner.config_cls, None, options)
    except ValueError as exc:
        raise RlhbError(str(exc)) from None
    return config, runner.stage_of(config) if runner.stage_of else command


def run_step(run_dir: Path, command: str, options: dict[str, Any], stage_name: str | None = None,
             force: bool = False) -> tuple[str, dict]:
    """Run stage `command` with `options` into RUN_DIR/STAGE_NAME (default: the command's own folder)."""
    config, default_name = build_step(command, options, run_dir)
    name = stage_name or default_name
    if command == "report":
        from rlhb_cli.stages import report as report_stage
        return name, run_stage(name, run_dir / name, config, report_stage.run, force=True)
    runner = STAGE_RUNNERS[command]
    upstream: tuple[str, ...] = ()
    if command == "prepare-behaviors" and config.logs is None:
        config.logs = rundir.require_stage(run_dir, "simulate-logs") / "logs.jsonl"
        upstream = ("simulate-logs",)
    body = getattr(importlib.import_module(runner.module), runner.function)
    try:
        summary = run_stage(name, run_dir / name, config, body, getattr(config, "seed", None), upstream, force)
    except ValueError as exc:
        raise RlhbError(str(exc)) from None
    return name, summary


def _register_stages() -> None:
    """Every stage a plan can name. The CLI makes a command of each; its config class gives the options."""
    from rlhb_cli.behaviors.prepare import PrepareConfig
    from rlhb_cli.rl.aligners import CustomPPOConfig, OracleConfig, RLHBCConfig, RLHBConfig, RLHFConfig
    from rlhb_cli.simulator.simulate import SimulateConfig
    from rlhb_cli.stages.classifier import ClassifierConfig
    from rlhb_cli.stages.discriminator import DiscriminatorConfig
    from rlhb_cli.stages.evaluate import EvaluateConfig
    from rlhb_cli.stages.reward import RewardConfig
    from rlhb_cli.stages.sft import SFTStageConfig

    aligners = "rlhb_cli.rl.aligners"
    register("simulate-logs", StageRunner(SimulateConfig, "rlhb_cli.simulator.simulate"))
    register("prepare-behaviors", StageRunner(PrepareConfig, "rlhb_cli.behaviors.prepare"))
    register("train-sft", StageRunner(SFTStageConfig, "rlhb_cli.stages.sft"))
    register("warmup-discriminator", StageRunner(DiscriminatorConfig, "rlhb_cli.stages.discriminator"))
    register("train-classifier", StageRunner(ClassifierConfig, "rlhb_cli.stages.classifier"))
    register("train-reward", StageRunner(RewardConfig, "rlhb_cli.stages.reward"))
    register("train-rlhf", StageRunner(RLHFConfig, aligners, "run_rlhf"))
    register("train-rlhbc", StageRunner(RLHBCConfig, aligners, "run_rlhbc"))
    register("train-rlhb", StageRunner(RLHBConfig, aligners, "run_rlhb",
                                       stage_of=lambda c: "train-rlgaf" if c.no_behavior else "train-rlhb"))
    register("train-oracle", StageRunner(OracleConfig, aligners, "run_oracle"))
    register("evaluate", StageRunner(EvaluateConfig, "rlhb_cli.stages.evaluate"))
    register("train-ppo", StageRunner(CustomPPOConfig, aligners, "run_custom"))


_register_stages()
