"""What a PPO run shows on the terminal: a progress bar with reward and KL, and tables of sample completions
(also appended to samples.jsonl)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from rlhb_cli.rundir import MetricsLog


def console_and_progress(main_process: bool) -> tuple[Console, Progress]:
    """A stderr console and a progress bar, quiet when stderr is not a terminal and in all processes but the main."""
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("reward {task.fields[reward]:.3f}"), TextColumn("kl {task.fields[kl]:.2f}"),
                        TimeRemainingColumn(), console=console, transient=True,
                        disable=not (console.is_terminal and main_process))
    return console, progress


def show_samples(console: Console, samples: MetricsLog, stage: str, iteration: int, rollout, raw, count: int = 4) -> None:
    """The first `count` completions of the iteration's rollout with their source's reward."""
    table = Table(title=f"{stage}: samples at iteration {iteration}", title_justify="left", show_lines=True)
    for column in ("query", "response", "reward"):
        table.add_column(column, overflow="fold")
    for i in range(min(count, len(rollout.texts))):
        table.add_row(rollout.queries[i][:80], rollout.texts[i][:200], f"{float(raw[i]):.3f}")
        samples.write({"step": iteration, "query": rollout.queries[i], "behavior": rollout.behaviors[i],
                       "response": rollout.texts[i], "reward": float(raw[i])})
    console.print(table)
