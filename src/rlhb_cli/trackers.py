"""Experiment trackers (TensorBoard, Weights & Biases, trackio) through accelerate's tracker classes.

Every row a training stage appends to its metrics.jsonl is sent to each tracker as it is written, under the
same keys and step, so a dashboard shows exactly the record; metrics.jsonl stays the source of truth. The
trl-trained stages (SFT, the reward model) write their rows from the Trainer's log through the same path
rather than through the Trainer's own `report_to`, whose keys (`train/loss`, ...) would differ from the
record's. Where each tracker keeps its data: TensorBoard in RUN_DIR/tensorboard/STAGE; wandb under RUN_DIR
(project: the run dir's name, run: the stage; online or offline as WANDB_MODE says); trackio in its own
store (TRACKIO_DIR, default ~/.cache/huggingface/trackio), project and run named as wandb's.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Iterable

from rlhb_cli.errors import RlhbError

# tracker -> (module it needs, the pyproject extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`--report-to tensorboard,wandb` -> ("tensorboard", "wandb"); "none" or nothing -> (). A tracker that is
    unknown, or whose package is not installed, is refused here, before any training starts."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    names = [p.strip().lower() for p in parts if p.strip()]
    if names in ([], ["none"]):
        return ()
    out: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise RlhbError(f"--report-to {name}: unknown tracker; choose from {', '.join(TRACKERS)} or none")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise RlhbError(f"--report-to {name}: {module} is not installed; pip install 'rlhb-cli[{extra}]'")
        if name not in out:
            out.append(name)
    return tuple(out)


def hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config flattened to the scalar values every tracker accepts (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's finite numbers, without its step (the step is the x axis)."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Trackers:
    """The trackers of one stage run, started on the first row so that a stage with nothing to log opens none."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, stage: str, config: dict[str, Any]):
        self.names, self.run_dir, self.stage, self.config = names, Path(run_dir), stage, config
        self._open: list[Any] | None = None

    def _start(self) -> list[Any]:
        # deferred: accelerate's tracking module imports the tracker packages it finds, a second or more
        from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

        project = self.run_dir.resolve().name
        made = {"tensorboard": lambda: TensorBoardTracker(self.stage, self.run_dir / "tensorboard"),
                "wandb": lambda: WandBTracker(project, name=self.stage, dir=str(self.run_dir)),
                "trackio": lambda: TrackioTracker(project, name=self.stage)}
        opened = []
        for name in self.names:
            tracker = made[name]()
            tracker.start()
            tracker.store_init_configuration(hyperparameters(self.config))
            opened.append(tracker)
        return opened

    def log(self, row: dict[str, Any]) -> None:
        if not self.names:
            return
        if self._open is None:
            self._open = self._start()
        values = scalars(row)
        for tracker in self._open:
            tracker.log(values, step=row.get("step"))

    def finish(self) -> None:
        for tracker in self._open or []:
            tracker.finish()
        self._open = None
