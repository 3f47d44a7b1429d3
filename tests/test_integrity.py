"""The run directory keeps its word: one writer per stage, outputs checked against their hashes, staleness
that reaches every later stage, and no command writing a folder that is not its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhb_cli import rundir, storage
from rlhb_cli.errors import RlhbError

from conftest import TINY

SFT = ["--epochs", 1, "--max-train-rows", 512, "--batch-size", 32, "--learning-rate", 1e-2, *TINY]


def states(run_dir: Path, verify: bool = False) -> dict[str, tuple[str, str]]:
    return {r["stage"]: (r["state"], r["detail"]) for r in rundir.status_rows(run_dir, verify)}


def test_a_damaged_output_is_reported_and_refused_by_the_next_stage(cli, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    manifest = json.loads((sim_run / "prepare-behaviors" / "manifest.json").read_text())
    assert "bins.json" in manifest["outputs"] and "summary.json" in manifest["outputs"]
    assert all(len(info["sha256"]) == 64 for info in manifest["outputs"].values())
    arrow = next(name for name in manifest["outputs"] if name.endswith(".arrow"))

    target = sim_run / "prepare-behaviors" / arrow
    target.write_bytes(target.read_bytes()[:100])  # truncated, as by a disk that filled or a bad copy
    state, detail = states(sim_run)["prepare-behaviors"]
    assert state == "damaged" and detail.startswith(f"{arrow} has 100 bytes")
    result = cli("train-sft", "--run-dir", sim_run, *SFT, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"prepare-behaviors in {sim_run} is damaged: {arrow} has 100 bytes" in result.output
    assert "run `rlhb prepare-behaviors LOGS --run-dir" in result.output
    assert "damaged" in cli("status", "--run-dir", sim_run).output


def test_a_same_size_change_is_found_by_verify_and_by_a_changed_mtime(cli, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    bins = sim_run / "prepare-behaviors" / "bins.json"
    stat = bins.stat()
    flipped = bins.read_bytes().replace(b"0", b"1", 1)
    bins.write_bytes(flipped)
    os.utime(bins, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only a re-hash sees it
    assert states(sim_run)["prepare-behaviors"][0] == "done"
    assert states(sim_run, verify=True)["prepare-behaviors"] == (
        "damaged", "bins.json changed since it was written (its sha256 differs)")
    assert "damaged" in cli("status", "--run-dir", sim_run, "--verify").output
    bins.touch()  # a newer mtime: the fast path re-hashes it too
    assert states(sim_run)["prepare-behaviors"][0] == "damaged"


def test_staleness_reaches_every_later_stage(cli, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    cli("train-sft", "--run-dir", sim_run, *SFT)
    assert states(sim_run)["train-sft"][0] == "done"
    logs = sim_run / "simulate-logs" / "logs.jsonl"
    manifest_path = sim_run / "simulate-logs" / "manifest.json"
    logs.write_text(logs.read_text(encoding="utf-8") + logs.read_text(encoding="utf-8").splitlines()[0] + "\n",
                    encoding="utf-8")
    # the logs are the simulator's output: its record is renewed as a rerun would, so only the change shows
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"] = storage.record_outputs(sim_run / "simulate-logs", {"manifest.json"})
    manifest_path.write_text(json.dumps(manifest))
    found = states(sim_run)
    assert found["simulate-logs"][0] == "done"
    assert found["prepare-behaviors"] == ("stale", "inputs changed since: logs")
    assert found["train-sft"] == ("stale", "prepare-behaviors is stale")
    with pytest.raises(RlhbError, match="train-sft in .* is stale: prepare-behaviors is stale"):
        rundir.require_stage(sim_run, "train-sft")
    # a stale stage is rerun, not skipped as done
    cli("prepare-behaviors", "--run-dir", sim_run)
    assert states(sim_run)["train-sft"] == ("stale", "prepare-behaviors was rerun since")
    rerun = cli("train-sft", "--run-dir", sim_run, *SFT)
    assert "already done" not in rerun.output and states(sim_run)["train-sft"][0] == "done"


def test_no_command_writes_another_stages_folder(cli, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    before = (sim_run / "prepare-behaviors" / "manifest.json").read_bytes()
    result = cli("train-rlhb", "--run-dir", sim_run, "--stage-name", "prepare-behaviors", ok=False)
    assert result.exit_code == 2 and "is prepare-behaviors's folder, which train-rlhb may not write" in result.output
    assert (sim_run / "prepare-behaviors" / "manifest.json").read_bytes() == before
    assert states(sim_run)["prepare-behaviors"][0] == "done"
    # a stage's own folder name is its own even before it exists
    result = cli("train-rlhf", "--run-dir", sim_run, "--stage-name", "train-sft", ok=False)
    assert "is train-sft's folder, which train-rlhf may not write" in result.output
    assert not (sim_run / "train-sft" / "manifest.json").exists()


def test_a_second_writer_is_refused_naming_the_holder(cli, sim_run):
    """Two processes on one stage: the second is refused at once with the first one's pid, and the stage's
    record is the first one's alone."""
    cli("prepare-behaviors", "--run-dir", sim_run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path;"
         "from rlhb_cli import storage; ctx = storage.stage_lock(Path(sys.argv[1]));"
         "ctx.__enter__(); print('held', flush=True); time.sleep(60)", str(sim_run / "train-sft")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert storage.lock_holder(sim_run / "train-sft")["pid"] == holder.pid
        result = cli("train-sft", "--run-dir", sim_run, *SFT, ok=False)
        assert result.exit_code == 2 and f"is being written by pid {holder.pid} on" in result.output
        assert not (sim_run / "train-sft" / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9 leaves its lock file behind): the lock is taken over, the stage runs
    assert storage.lock_holder(sim_run / "train-sft") is None
    cli("train-sft", "--run-dir", sim_run, *SFT)
    assert states(sim_run)["train-sft"][0] == "done"


def test_two_writers_at_once_are_serialised(cli, sim_run):
    """Two real train-sft processes, the second started while the first trains: exactly one trains (the
    second is refused, or finds the stage done when it got there late), and the metrics hold every step once."""
    cli("prepare-behaviors", "--run-dir", sim_run)
    longer = [*SFT, "--max-train-rows", 2048]
    command = [sys.executable, "-m", "rlhb_cli", "train-sft", "--run-dir", str(sim_run), *map(str, longer)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while storage.lock_holder(sim_run / "train-sft") is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    said = second.stderr + second.stdout
    assert (second.returncode == 2 and f"is being written by pid {first.pid}" in said) or \
        (second.returncode == 0 and "already done" in said), said[-2000:]
    assert "Traceback" not in second.stderr
    steps = [row["step"] for row in map(json.loads, (sim_run / "train-sft" / "metrics.jsonl").read_text().splitlines())
             if "loss/train" in row]
    assert steps == sorted(set(steps)) and states(sim_run)["train-sft"][0] == "done"
