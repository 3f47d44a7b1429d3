"""A checkpoint planted in a run dir runs no code on --resume: it is refused in one line, and what it would
have run never happened. (torch.load with weights_only=False unpickles any object, and so calls any function.)"""

from __future__ import annotations

import pathlib

import torch

from conftest import RL


class Planted:
    """What an attacker's pickle does on loading: here, create a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant(checkpoint: pathlib.Path, marker: pathlib.Path) -> None:
    state = torch.load(checkpoint, weights_only=True)  # a real checkpoint, with one object added
    state["extra"] = Planted(marker)
    torch.save(state, checkpoint)


def test_a_planted_rl_checkpoint_is_refused_and_runs_nothing(rl_run, cli, tmp_path):
    args = ["--iterations", 3, *RL, "--checkpoint-every", 1]
    cli("train-rlhb", "--run-dir", rl_run, *args, "--stop-after-steps", 1)
    marker = tmp_path / "code-ran"
    _plant(rl_run / "train-rlhb" / "checkpoint.pt", marker)
    result = cli("train-rlhb", "--run-dir", rl_run, *args, "--resume", ok=False)
    assert result.exit_code == 2 and "holds more than tensors and plain values" in result.output, result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_a_planted_judge_checkpoint_is_refused_and_runs_nothing(rl_run, cli, tmp_path):
    args = ["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 600, "--force"]
    cli("warmup-discriminator", "--run-dir", rl_run, *args, "--stop-after-steps", 3)
    marker = tmp_path / "code-ran"
    _plant(rl_run / "warmup-discriminator" / "checkpoint.pt", marker)
    result = cli("warmup-discriminator", "--run-dir", rl_run, *args, "--resume", ok=False)
    assert result.exit_code == 2 and "holds more than tensors and plain values" in result.output, result.output
    assert not marker.exists()
