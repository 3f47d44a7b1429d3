"""The run directory: the contract between stages.

Each stage writes into `RUN_DIR/<stage>/`: its artifacts, `summary.json` (headline figures) and
`manifest.json` (resolved config, every input with its sha256, library versions, git commit, seed,
start/end time, status, torch's thread count). The manifest says `running` while the stage works and `done` only after
every artifact is in place, so a later stage never reads a half-written one. Artifacts are written to
a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rlhb_cli import distributed
from rlhb_cli.config import config_to_dict
from rlhb_cli.distributed import is_main_process
from rlhb_cli.errors import RlhbError
from rlhb_cli.registry import STAGES, rerun_hint

MANIFEST = "manifest.json"
SUMMARY = "summary.json"

_LIBRARIES = ("rlhb-cli", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "pyarrow", "numpy")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, flush, then rename: readers see the old file or the whole new one, never a part.
    Under a launcher only the main process writes (the others hold the same bytes)."""
    if not is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.
    Under a launcher the other processes write into scratch space that is thrown away."""
    if not is_main_process():
        scratch = Path(tempfile.mkdtemp(prefix=f"rlhb-rank{distributed.process_index()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- hashing
def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory as the sorted (relative path, file hash) list."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(sha256_of(child).encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def stage_state(stage_dir: Path) -> tuple[str, dict[str, Any] | None, str]:
    """(state, manifest, detail): state is done / failed / stale / running / interrupted / missing."""
    manifest = load_manifest(stage_dir)
    if manifest is None:
        return "missing", None, ""
    status = manifest.get("status")
    if status == "running":
        if manifest.get("host") == platform.node() and _pid_alive(manifest.get("pid")):
            return "running", manifest, ""
        return "interrupted", manifest, "stopped before it finished"
    if status == "stopped":
        return "stopped", manifest, (manifest.get("error") or "") + "; continue with --resume"
    if status != "done":
        return "failed", manifest, manifest.get("error", "")
    changed = changed_inputs(manifest, Path(stage_dir).parent)
    if changed:
        return "stale", manifest, "inputs changed since: " + ", ".join(changed)
    for upstream, recorded in (manifest.get("upstream") or {}).items():
        up_manifest = Path(stage_dir).parent / upstream / MANIFEST
        if not up_manifest.exists() or sha256_of(up_manifest) != recorded:
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

    def _flush(self) -> None:
        if is_main_process():
            atomic_write_json(self.dir / self.manifest_name, self.manifest)


@contextlib.contextmanager
def open_stage(stage_dir: Path, stage: str, config: Any, seed: int | None,
               manifest_name: str = MANIFEST) -> Iterator[StageRun]:
    """Record a stage run: manifest `running` at start, `done` or `failed` (with the error) at the end."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "stage": stage,
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
        manifest["status"] = "stopped"
        manifest["error"] = str(exc)
        manifest["finished_at"] = now()
        run._flush()
        raise
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = str(exc) or type(exc).__name__
        manifest["finished_at"] = now()
        run._flush()
        raise
    manifest["status"] = "done"
    manifest["finished_at"] = now()
    manifest["torch_threads"] = torch_threads()
    run._flush()
    distributed.wait_for_everyone()  # what this stage wrote is there for every process's next step


def torch_threads() -> int | None:
    """torch's intra-op threads in this process (None when the stage did not use torch): float sums are
    split by thread, so the same seed gives the same numbers only with the same count."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def status_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per pipeline stage (and any other stage found in the run dir) for `rlhb status`."""
    run_dir = Path(run_dir)
    names = list(STAGES)
    if run_dir.is_dir():
        names += sorted(p.name for p in run_dir.iterdir() if (p / MANIFEST).exists() and p.name not in STAGES)
    rows = []
    for name in names:
        state, manifest, detail = stage_state(run_dir / name)
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
    """metrics.jsonl: one JSON object a line, appended as training goes; truncated to a step on resume."""

    def __init__(self, path: Path):
        self.path = path
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

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tail_mean(rows: list[dict], key: str) -> float | None:
    """A training figure at the end of a run: its mean over the last tenth of the rows (finite values)."""
    tail = rows[-max(1, len(rows) // 10):]
    values = [r[key] for r in tail if r.get(key) is not None and math.isfinite(r[key])]
    return round(float(np.mean(values)), 4) if values else None
