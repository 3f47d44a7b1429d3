"""Shared fixtures: the real CLI through Typer's CliRunner, and a small simulated run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhb_cli.cli import app

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers, one per core: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ["--tiny-hidden-size", 32, "--tiny-layers", 1, "--tiny-heads", 2, "--tiny-vocab-size", 400]
# RL options that keep an aligner run to seconds on the tiny base
RL = ["--prompts-per-iteration", 8, "--rollouts", 1, "--minibatch-size", 8, "--max-new-tokens", 12,
      "--sample-every", 0]


class Cli:
    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, ok: bool = True):
        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        if ok and result.exit_code != 0:
            raise AssertionError(f"rlhb {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
        return result


def torchrun(*args, processes: int = 2, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """`rlhb ARGS` under `torchrun --nproc_per_node PROCESSES` on this CPU, one thread per process."""
    tests = Path(__file__).parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "rlhb_cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tests,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests), **(env or {})))
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def summary_of(run_dir: Path, stage: str) -> dict:
    return json.loads((Path(run_dir) / stage / "summary.json").read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory, cli) -> Path:
    """A run dir with a small simulation (fewer impressions, fewer draws) that tests copy, never change."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    cli("simulate-logs", "--run-dir", run_dir, "--impressions", 200_000, "--queries", 120, "--eval-queries", 40)
    return run_dir


def private_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a shared run dir that one test may change."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


@pytest.fixture
def sim_run(small_sim, tmp_path) -> Path:
    """A private copy of the small simulated run dir."""
    return private_copy(small_sim, tmp_path)


@pytest.fixture(scope="session")
def default_sim(tmp_path_factory, cli) -> Path:
    """The simulator at its defaults (3M impressions), as `make demo` runs it."""
    out = tmp_path_factory.mktemp("default") / "sim"
    cli("simulate-logs", "--out", out)
    return out


@pytest.fixture(scope="session")
def rl_base(small_sim, tmp_path_factory, cli):
    """SFT policy (vocabulary 400) and judges on fresh tiny backbones with their own tokenizers (1000)."""
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    shutil.copytree(small_sim, run_dir)
    cli("prepare-behaviors", "--run-dir", run_dir)
    cli("train-sft", "--run-dir", run_dir, "--epochs", 2, "--max-train-rows", 4000, "--learning-rate", 1e-2, *TINY)
    cli("warmup-discriminator", "--run-dir", run_dir, "--backbone", "tiny", "--epochs", 1, "--max-train-rows", 1500,
        "--learning-rate", 3e-3)
    cli("train-classifier", "--run-dir", run_dir, "--backbone", "tiny", "--epochs", 1, "--max-train-rows", 1500)
    cli("train-reward", "--run-dir", run_dir, "--backbone", "tiny", "--epochs", 1)
    return run_dir


@pytest.fixture
def rl_run(rl_base, tmp_path) -> Path:
    """A private copy of the RL base run dir."""
    return private_copy(rl_base, tmp_path)


def without_time(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock figures, which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
