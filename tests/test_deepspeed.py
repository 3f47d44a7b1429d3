"""The training stages under DeepSpeed ZeRO-2, one process on CPU (DeepSpeed's CPU accelerator, gloo).

accelerate counts a CPU DeepSpeed launch of several processes as one process each, so only one process
runs here: what it checks is the DeepSpeed code path itself (its engine owns backward, clipping and the
optimizer step; its optimizer state is ZeRO's), not sharding across processes. Skipped without deepspeed
(`make test-deepspeed` installs it and runs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import TINY, read_jsonl, summary_of, torchrun, without_time

pytest.importorskip("deepspeed")

RL = ["--prompts-per-iteration", 8, "--rollouts", 1, "--minibatch-size", 8, "--max-new-tokens", 10,
      "--sample-every", 0, "--iterations", 3, "--disc-steps", 2, "--disc-learning-rate", 1e-3]
ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
         "ACCELERATE_GRADIENT_CLIPPING": "1.0", "DS_ACCELERATOR": "cpu"}


def zero2(*args) -> subprocess.CompletedProcess:
    return torchrun(*args, processes=1, env=ZERO2)


def close(a: list[dict], b: list[dict], rel: float) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=rel, abs=1e-6) for k in x
                                     if isinstance(x[k], float) and not k.startswith("time/"))
        for x, y in zip(a, b))


def test_train_rlhb_under_zero2_learns_as_without_it_and_resumes_exactly(rl_run, cli):
    cli("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "plain")
    zero2("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "zero2")
    plain = read_jsonl(rl_run / "plain" / "metrics.jsonl")
    under = read_jsonl(rl_run / "zero2" / "metrics.jsonl")
    # DeepSpeed's optimizer (flat fp32 partitions) and its one global clip: the same run up to rounding
    assert close(plain, under, rel=1e-2) and without_time(plain) != without_time(under)
    assert any("under DeepSpeed" in note for note in summary_of(rl_run, "zero2")["notes"])
    # ZeRO's sharded optimizer state goes into the checkpoint and comes back: the uninterrupted run's numbers
    zero2("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--stop-after-steps", 2)
    assert len(read_jsonl(rl_run / "resumed" / "metrics.jsonl")) == 2
    # (a sharded checkpoint does not resume without DeepSpeed: said in one line, the checkpoint kept)
    result = cli("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--resume", ok=False)
    assert result.exit_code == 2 and "written under DeepSpeed" in result.output
    zero2("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--resume")
    assert without_time(read_jsonl(rl_run / "resumed" / "metrics.jsonl")) == without_time(under)


def test_lora_train_rlhb_runs_under_zero2(rl_run):
    zero2("train-rlhb", "--run-dir", rl_run, *RL, "--lora-r", 4, "--stage-name", "lora")
    summary = summary_of(rl_run, "lora")
    assert summary["iterations"] == 3 and summary["trainable_parameters"] < summary["policy_parameters"]


def test_train_sft_and_train_reward_under_zero2_match_the_plain_run(sim_run, tmp_path, cli):
    cli("prepare-behaviors", "--run-dir", sim_run)
    twin = tmp_path / "twin"
    shutil.copytree(sim_run, twin)
    sft = ["--epochs", 1, "--max-train-rows", 1000, "--learning-rate", 1e-2, *TINY]
    cli("train-sft", "--run-dir", sim_run, *sft)
    zero2("train-sft", "--run-dir", twin, *sft)
    plain, under = summary_of(sim_run, "train-sft"), summary_of(twin, "train-sft")
    assert under["val_perplexity"] == pytest.approx(plain["val_perplexity"], rel=1e-3)
    # transformers evaluates a model before its training under DeepSpeed only at ZeRO-3: said, not faked
    assert under["untrained_val_perplexity"] is None and any("ZeRO-3" in n for n in under["notes"])
    cli("train-reward", "--run-dir", sim_run, "--backbone", "tiny", "--epochs", 1)
    zero2("train-reward", "--run-dir", twin, "--backbone", "tiny", "--epochs", 1)
    plain, under = summary_of(sim_run, "train-reward"), summary_of(twin, "train-reward")
    assert under["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-2)
    assert json.loads((twin / "train-reward" / "manifest.json").read_text())["status"] == "done"
