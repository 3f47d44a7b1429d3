"""The run directory: the contract between stages.

Each stage writes into `RUN_DIR/<stage>/`: its artifacts, `summary.json` (headline figures) and
`manifest.json` (resolved config, every input with its sha256, every output with its size and sha256,
library versions, git commit, seed, start/end time, status, torch's thread count). The manifest says
`running` while the stage works and `done` only after every artifact is in place and recorded, so a later
stage never reads a half-written one; it refuses one that is damaged or stale since. Artifacts are written
to a temporary name and renamed into place (`storage`), and a stage is written under its lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rlhb_cli import distributed, storage
from rlhb_cli.config import config_to_dict
from rlhb_cli.distributed import is_main_process
from rlhb_cli.errors import RlhbError
from rlhb_cli.registry import STAGES, rerun_hint
from rlhb_cli.storage import atomic_write_json, atomic_write_text, sha256_of
from rlhb_cli.trackers import Trackers

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
RESUME_POINTS = ("checkpoint.pt", "checkpoints")  # what training stages keep to continue from with --resume

_LIBRARIES = ("rlhb-cli", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "pyarrow", "numpy")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_input(path: Path, run_dir: Path | None = None) -> dict[str, Any]:
    """Path, sha256 and size of an input; a path inside the run directory is kept relative to it, so a
    run directory can be moved or copied whole."""
    path = Path(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    shown = str(path.resolve())
    if run_dir is not None and path.resolve().is_relative_to(Path(run_dir).resolve()):
        shown = "RUN_DIR/" + str(path.resolve().relative_to(Path(run_dir).resolve()))
    return {"path": shown, "sha256": sha256_of(path), "bytes": size}


def input_path(recorded: str, run_dir: Path) -> Path:
    return Path(run_dir) / recorded[len("RUN_DIR/"):] if recorded.startswith("RUN_DIR/") else Path(recorded)


def load_checkpoint_file(path: Path, allowed: tuple[type, ...] = ()) -> dict:
    """A checkpoint read with `torch.load(weights_only=True)`: tensors and plain Python values only, so a file
    planted in a run dir runs no code when a stage resumes from it. `allowed`: the few value classes a
    checkpoint of that kind holds besides (DeepSpeed's ZeRO optimizer state)."""
    import torch  # (deferred: `rlhb status` reads this module and needs no torch)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RlhbError(f"{path}: holds more than tensors and plain values ({reason[:160]}), so it is not loaded "
                        f"(a DeepSpeed run's checkpoint needs deepspeed installed); run without --resume to start "
                        f"over") from None


# ----------------------------------------------------------------------------------------- provenance
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the rlhb source in use (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return {"status": "failed", "error": f"{path}: manifest is not readable JSON"}


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def changed_inputs(manifest: dict[str, Any], run_dir: Path) -> list[str]:
    """Names of recorded inputs whose file is gone or whose content hash differs now."""
    changed = []
    for name, info in (manifest.get("inputs") or {}).items():
        path = input_path(info["path"], run_dir)
        if not path.exists() or sha256_of(path) != info["sha256"]:
            changed.append(name)
    return changed


def stage_state(stage_dir: Path, verify: bool = False,
                _seen: dict | None = None) -> tuple[str, dict[str, Any] | None, str]:
    """(state, manifest, detail): done / failed / stale / damaged / running / interrupted / stopped / missing.

    A done stage is damaged when an output differs from what it wrote (size and modification time, or
    every byte with `verify`), and stale when an input changed or any stage upstream of it, however far,
    is not done or was rerun since it read it."""
    stage_dir = Path(stage_dir)
    seen = {} if _seen is None else _seen
    key = str(stage_dir.resolve())
    if key in seen:
        return seen[key]
    seen[key] = ("stale", None, "its upstream stages name it")  # a cycle of upstreams is never done
    seen[key] = result = _state_of(stage_dir, verify, seen)
    return result


def _state_of(stage_dir: Path, verify: bool, seen: dict) -> tuple[str, dict[str, Any] | None, str]:
    manifest = load_manifest(stage_dir)
    if manifest is None:
        return "missing", None, ""
    status = manifest.get("status")
    if status == "running":
        holder = storage.lock_holder(stage_dir)
        if holder is not None or (manifest.get("host") == platform.node() and _pid_alive(manifest.get("pid"))):
            return "running", manifest, ""
        return "interrupted", manifest, "stopped before it finished"
    if status == "stopped":
        return "stopped", manifest, (manifest.get("error") or "") + "; continue with --resume"
    if status != "done":
        return "failed", manifest, manifest.get("error", "")
    damage = storage.check_outputs(stage_dir, manifest.get("outputs") or {}, rehash=verify)
    if damage:
        return "damaged", manifest, damage
    changed = changed_inputs(manifest, stage_dir.parent)
    if changed:
        return "stale", manifest, "inputs changed since: " + ", ".join(changed)
    for upstream, recorded in (manifest.get("upstream") or {}).items():
        up_dir = stage_dir.parent / upstream
        up_state, _, _ = stage_state(up_dir, verify, seen)
        if up_state != "done":
            return "stale", manifest, f"{upstream} is {up_state}"
        if sha256_of(up_dir / MANIFEST) != recorded:
            return "stale", manifest, f"{upstream} was rerun since"
    return "done", manifest, ""


def require_stage(run_dir: Path, stage: str) -> Path:
    """The done, fresh output directory of an earlier stage, or a one-line refusal naming the fix."""
    stage_dir = Path(run_dir) / stage
    state, _, detail = stage_state(stage_dir)
    if state == "done":
        return stage_dir
    fix = rerun_hint(stage, run_dir)
    if state == "missing":
        raise RlhbError(f"{stage} has not run in {run_dir}: run `{fix}` first")
    raise RlhbError(f"{stage} in {run_dir} is {state}{': ' + detail if detail else ''}; run `{fix}` again")


def stage_or_path(value: str, run_dir: Path, stage: "StageRun", inner: str, what: str) -> Path:
    """`value` names a stage of the run dir (its `inner` folder is used, recorded as upstream) or is a path
    (recorded as an input with its hash)."""
    if value in STAGES or (run_dir / value / MANIFEST).exists():
        found = require_stage(run_dir, value) / inner
        if not found.exists():
            raise RlhbError(f"{run_dir / value}: has no {inner}/, so it cannot give the {what}")
        stage.add_upstream(value)
        return found
    path = Path(value)
    if not path.exists():
        raise RlhbError(f"{path}: no such {what} (give a stage of {run_dir} or a path)")
    stage.add_input(what, path)
    return path


# ----------------------------------------------------------------------------------------- one stage run
class StageStopped(Exception):
    """A training stage stopped on purpose (e.g. --stop-after-steps) after writing a checkpoint."""


@dataclass
class StageRun:
    """An open stage: its directory, the manifest being written for it, and how to run it."""

    stage: str
    dir: Path
    manifest: dict[str, Any]
    manifest_name: str = MANIFEST
    resume: bool = False  # continue from the stage's checkpoint, if it has one
    stop_after_steps: int | None = None  # stop (resumably) after this many optimizer steps in all
    outputs: tuple[str, ...] = ()  # a single-file stage's files (a stage folder's outputs are all its files)
    report_to: tuple[str, ...] = ()  # experiment trackers that see every metrics row (trackers.py)
    _trackers: Trackers | None = None

    @property
    def trackers(self) -> Trackers:
        if self._trackers is None:
            self._trackers = Trackers(self.report_to if is_main_process() else (), self.dir.parent, self.stage,
                                      self.manifest["config"])
        return self._trackers

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.dir / name
        if is_main_process():
            atomic_write_json(path, obj)
        return path

    def add_input(self, name: str, path: Path) -> None:
        in_run_dir = self.dir.parent if self.manifest_name == MANIFEST else None  # single-file stages have no run dir
        self.manifest["inputs"][name] = describe_input(path, in_run_dir)
        self._flush()

    def add_upstream(self, stage: str) -> None:
        self.manifest["upstream"][stage] = sha256_of(self.dir.parent / stage / MANIFEST)
        self._flush()

    def set_summary(self, summary: dict[str, Any]) -> None:
        if self.manifest_name == MANIFEST:
            self.manifest["summary_file"] = SUMMARY
            self.write_json(SUMMARY, summary)
        else:  # a stage that writes single files keeps its summary in its manifest
            self.manifest["summary"] = summary

    def _finish(self, status: str, error: str | None = None) -> None:
        self.manifest["status"] = status
        if error is not None:
            self.manifest["error"] = error
        self.manifest["finished_at"] = now()
        self._flush()

    def _flush(self) -> None:
        if is_main_process():
            atomic_write_json(self.dir / self.manifest_name, self.manifest)


@contextlib.contextmanager
def open_stage(stage_dir: Path, stage: str, config: Any, seed: int | None, manifest_name: str = MANIFEST,
               command: str | None = None) -> Iterator[StageRun]:
    """Record a stage run under its lock: manifest `running` at start, `done` (with every output's size and
    hash) or `failed` (with the error) at the end. A folder that belongs to another command is refused
    before anything in it is touched."""
    stage_dir = Path(stage_dir)
    command = command or stage
    lock_name = storage.LOCK if manifest_name == MANIFEST else f".{manifest_name}.lock"
    with storage.stage_lock(stage_dir, lock_name, f"{stage} in {stage_dir.parent}"):
        if manifest_name == MANIFEST:
            owner = owner_of(stage_dir)
            if owner and owner != command:
                raise RlhbError(f"{stage_dir}: is {owner}'s folder, which {command} may not write; give "
                                f"--stage-name a folder of its own")
        manifest: dict[str, Any] = {
            "stage": stage,
            "made_by": command,
            "status": "running",
            "config": config_to_dict(config),
            "seed": seed,
            "inputs": {},
            "upstream": {},
            "versions": library_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "host": platform.node(),
            "pid": os.getpid(),
            "started_at": now(),
            "finished_at": None,
        }
        run = StageRun(stage, stage_dir, manifest, manifest_name)
        run._flush()
        try:
            yield run
        except StageStopped as exc:
            run._finish("stopped", str(exc))
            raise
        except BaseException as exc:
            run._finish("failed", str(exc) or type(exc).__name__)
            raise
        finally:
            run.trackers.finish()
        manifest["torch_threads"] = torch_threads()
        if is_main_process():
            manifest["outputs"] = (storage.record_outputs(stage_dir, {manifest_name}) if manifest_name == MANIFEST
                                   else storage.record_outputs(stage_dir, set(), only=run.outputs) if run.outputs
                                   else {})
        run._finish("done")
    distributed.wait_for_everyone()  # what this stage wrote is there for every process's next step


def owner_of(stage_dir: Path) -> str | None:
    """The command whose folder this is: the one its manifest names, or the registry's for a stage's own
    folder name (train-rlgaf is train-rlhb's); None for a free folder."""
    manifest = load_manifest(stage_dir) or {}
    if manifest.get("made_by"):
        return manifest["made_by"]
    spec = STAGES.get(Path(stage_dir).name)
    return (spec.made_by or spec.name) if spec else None


def discard_resume_points(stage_dir: Path) -> None:
    """A run that is not a resume starts without the checkpoints of an earlier run, so that a later
    `--resume` continues this run and never an older one (killed before its first save, it starts over)."""
    if not is_main_process():
        return
    for name in RESUME_POINTS:
        path = Path(stage_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def torch_threads() -> int | None:
    """torch's intra-op threads in this process (None when the stage did not use torch): float sums are
    split by thread, so the same seed gives the same numbers only with the same count."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def status_rows(run_dir: Path, verify: bool = False) -> list[dict[str, Any]]:
    """One row per pipeline stage (and any other stage found in the run dir) for `rlhb status`."""
    run_dir = Path(run_dir)
    names = list(STAGES)
    if run_dir.is_dir():
        names += sorted(p.name for p in run_dir.iterdir() if (p / MANIFEST).exists() and p.name not in STAGES)
    rows, seen = [], {}
    for name in names:
        state, manifest, detail = stage_state(run_dir / name, verify, seen)
        summary = {}
        if manifest is not None and (run_dir / name / SUMMARY).exists():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                summary = read_json(run_dir / name / SUMMARY)
        rows.append(
            {
                "stage": name,
                "state": state,
                "detail": detail,
                "finished_at": (manifest or {}).get("finished_at"),
                "headline": {k: summary[k] for k in (STAGES[name].headline if name in STAGES else ()) if k in summary}
                or {k: v for k, v in summary.items() if isinstance(v, (int, float))},
            }
        )
    return rows


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended as training goes; truncated to a step on resume. Each
    row also goes to the stage's experiment trackers, if any (after a resume they see the resumed steps again)."""

    def __init__(self, path: Path, trackers: Trackers | None = None):
        self.path = path
        self.trackers = trackers
        self.writes = is_main_process()  # one process writes; the others' rows are the same, gathered

    def keep_until(self, step: int) -> None:
        if not self.path.exists() or not self.writes:
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        if not self.writes:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tail_mean(rows: list[dict], key: str) -> float | None:
    """A training figure at the end of a run: its mean over the last tenth of the rows (finite values)."""
    tail = rows[-max(1, len(rows) // 10):]
    values = [r[key] for r in tail if r.get(key) is not None and math.isfinite(r[key])]
    return round(float(np.mean(values)), 4) if values else None
