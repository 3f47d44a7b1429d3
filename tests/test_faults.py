"""Fault injection: a training stage killed with SIGKILL at a random moment and resumed ends with the
uninterrupted run's metrics and summary; a checkpoint cut short is passed over; a full disk ends in one
line and leaves no stage done that is not whole."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhb_cli import storage

from conftest import RL, TINY, read_jsonl, summary_of

KILLED = {  # stage -> (its options, the metrics rows between which the kill lands)
    "train-sft": (["--epochs", 1, "--max-train-rows", 1024, "--batch-size", 32, "--learning-rate", 1e-2, *TINY,
                   "--checkpoint-every", 3], (2, 20)),
    "train-reward": (["--backbone", "tiny", "--epochs", 1, "--checkpoint-every", 3], (2, 12)),
    "warmup-discriminator": (["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 1500, "--learning-rate", 3e-3,
                              "--checkpoint-every", 4], (2, 8)),
    "train-rlhb": (["--iterations", 6, *RL, "--checkpoint-every", 1], (1, 4)),
}


def comparable(row: dict) -> dict:
    """A metrics row or a summary without what no two runs share: wall-clock time."""
    return {k: v for k, v in row.items() if "seconds" not in k and not k.startswith("time/")}


def kill_when(process: subprocess.Popen, stage_dir: Path, rows: int, timeout: float = 300) -> None:
    """SIGKILL `process` once it has taken the stage and its metrics.jsonl holds `rows` lines."""
    deadline = time.time() + timeout
    metrics = stage_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # an earlier run's
    while process.poll() is None and time.time() < deadline:
        if storage.lock_holder(stage_dir) and metrics.exists() and \
                metrics.read_text(encoding="utf-8").count("\n") >= rows:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=60)


@pytest.mark.parametrize("stage", list(KILLED))
def test_kill_9_then_resume_equals_the_uninterrupted_run(rl_run, cli, tmp_path, stage):
    args, (first, last) = KILLED[stage]
    straight = tmp_path / "straight"
    shutil.copytree(rl_run, straight)
    cli(stage, "--run-dir", straight, *args, "--force")

    moment = random.Random(f"{stage}-{os.getpid()}").randint(first, last)  # a different moment each session
    process = subprocess.Popen([sys.executable, "-m", "rlhb_cli", stage, "--run-dir", str(rl_run),
                                *map(str, args), "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(process, rl_run / stage, moment)
    assert process.returncode == -signal.SIGKILL, f"{stage} ended before the kill: {process.stderr.read()[-2000:]}"
    assert json.loads((rl_run / stage / "manifest.json").read_text())["status"] == "running"
    if stage == "train-sft":  # a newer checkpoint cut short by the kill is passed over, and removed
        partial = rl_run / stage / "checkpoints" / "checkpoint-999"
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"\0" * 100)
    cli(stage, "--run-dir", rl_run, *args, "--resume")
    assert list(map(comparable, read_jsonl(rl_run / stage / "metrics.jsonl"))) == \
        list(map(comparable, read_jsonl(straight / stage / "metrics.jsonl")))
    assert comparable(summary_of(rl_run, stage)) == comparable(summary_of(straight, stage))
    assert not (rl_run / stage / "checkpoints" / "checkpoint-999").exists()


FULL_DISK = """
import json, shutil, subprocess, sys
from pathlib import Path
source, mount, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
run = mount / "run"
shutil.copytree(source, run)
if how == "read-only":
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
done = subprocess.run([sys.executable, "-m", "rlhb_cli", "train-sft", "--run-dir", str(run), *sys.argv[4:]],
                      capture_output=True, text=True)
status = subprocess.run([sys.executable, "-c", "import json, sys; from rlhb_cli import rundir;"
                         "print(json.dumps(rundir.status_rows(sys.argv[1])))", str(run)], capture_output=True, text=True)
print(json.dumps({"code": done.returncode, "stderr": done.stderr, "stdout": done.stdout,
                  "status": json.loads(status.stdout or "[]"), "status_error": status.stderr}))
"""


def _can_mount_tmpfs() -> str:
    """Why a small tmpfs cannot be mounted here ("" when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command to mount a private tmpfs"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot mount a private tmpfs ({probe.stderr.strip()[:80]})"


@pytest.mark.skipif(bool(_can_mount_tmpfs()), reason=_can_mount_tmpfs() or "can mount")
@pytest.mark.parametrize("how, said", [("full", "the disk is full"), ("read-only", "the file system is read-only")])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing_done_that_is_not_whole(rl_run, tmp_path, how, said):
    shutil.rmtree(rl_run / "train-sft")
    for later in ("warmup-discriminator", "train-classifier", "train-reward"):
        shutil.rmtree(rl_run / later)
    used = sum(p.stat().st_size for p in rl_run.rglob("*") if p.is_file())
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(textwrap.dedent(FULL_DISK))
    size_kb = used // 1024 + 600  # the run as it is, and room for part of what SFT writes
    sft = KILLED["train-sft"][0]
    shell = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mount} && "
             f"{sys.executable} {script} {rl_run} {mount} {how} " + " ".join(map(str, sft)))
    result = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 2, report["stderr"][-3000:]
    assert "Traceback" not in report["stderr"] and said in report["stderr"], report["stderr"][-3000:]
    assert len(report["stderr"].strip().splitlines()) <= 3, report["stderr"]  # one message (wrapped by the terminal)
    state = {row["stage"]: row["state"] for row in report["status"]}
    assert state["prepare-behaviors"] == "done" and state["train-sft"] != "done", report
