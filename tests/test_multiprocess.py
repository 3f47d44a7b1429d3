"""The RL stages under `torchrun --nproc_per_node 2` on CPU (gloo): one run, two processes, one run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, private_copy, read_jsonl, summary_of, torchrun

TESTS = Path(__file__).parent
RL = ["--prompts-per-iteration", 8, "--rollouts", 1, "--minibatch-size", 8, "--max-new-tokens", 10,
      "--sample-every", 0, "--iterations", 3]


@pytest.fixture
def run(rl_run):
    return rl_run


def test_two_processes_train_rlhb_in_step_and_write_the_run_dir_once(run):
    # micro-batches of 2 of each process's 4 responses per mini-batch: only the last one's backward syncs
    torchrun("train-rlhb", "--run-dir", run, *RL, "--disc-steps", 2, "--reward-form", "probability",
             "--micro-batch-size", 2)
    summary = summary_of(run, "train-rlhb")
    # policy, critic and the learning discriminator: the same bytes in both processes (checked by the run)
    assert summary["processes"] == 2 and summary["processes_in_sync"] is True
    assert len(summary["weights_sha256"]) == 64
    rows = read_jsonl(run / "train-rlhb" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # written once, not once per process
    assert all("disc/score_real" in r for r in rows)
    manifest = json.loads((run / "train-rlhb" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["summary_file"] == "summary.json"
    assert sorted(p.name for p in (run / "train-rlhb").iterdir() if not p.name.startswith(".")) == \
        ["checkpoint.pt", "manifest.json", "metrics.jsonl", "policy", "summary.json"]


def test_metrics_are_the_gathered_values_and_each_process_has_its_own_prompts(run, tmp_path, cli, monkeypatch):
    record = tmp_path / "record"
    record.mkdir()
    torchrun("train-ppo", "--run-dir", run, "--reward-source", "rl_sources:records_each_process", *RL,
             env={"RLHB_TEST_RECORD": str(record)})
    ranks = [read_jsonl(record / f"rank{r}.jsonl") for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    rows = read_jsonl(run / "train-ppo" / "metrics.jsonl")
    for i, row in enumerate(rows):
        local = [np.mean(rank[i]["rewards"]) for rank in ranks]
        assert row["objective/reward_mean"] == pytest.approx(np.mean(local), abs=1e-6)
        both = np.concatenate([rank[i]["rewards"] for rank in ranks])
        assert row["objective/reward_std"] == pytest.approx(float(np.std(both, ddof=1)), abs=1e-5)
        assert not set(ranks[0][i]["queries"]) & set(ranks[1][i]["queries"])
    # the two processes' prompts together are the one-process run's prompts of that iteration
    single = tmp_path / "single"
    single.mkdir()
    monkeypatch.setenv("RLHB_TEST_RECORD", str(single))
    monkeypatch.chdir(TESTS)
    cli("train-ppo", "--run-dir", run, "--reward-source", "rl_sources:records_each_process", *RL[:-1], 1,
        "--stage-name", "one-process")
    alone = read_jsonl(single / "rank0.jsonl")[0]["queries"]
    assert sorted(alone) == sorted(ranks[0][0]["queries"] + ranks[1][0]["queries"])
    assert summary_of(run, "train-ppo")["processes_in_sync"] is True


SUPERVISED = [
    ("train-sft", ["--epochs", 1, "--max-train-rows", 400, "--batch-size", 16, *TINY]),
    # without the likelihood term (a mean over the real rows of each process's share) a step is exactly
    # the one-process step on the whole batch, so the two runs' numbers must agree
    ("warmup-discriminator", ["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 300, "--likelihood-weight", 0,
                              "--learning-rate", 3e-3]),
    ("train-classifier", ["--backbone", "tiny", "--epochs", 1, "--max-train-rows", 300]),
    ("train-reward", ["--backbone", "tiny", "--epochs", 1]),
]


def test_supervised_stages_under_two_processes_write_once_and_agree(small_sim, tmp_path, cli):
    two = private_copy(small_sim, tmp_path / "two")
    cli("prepare-behaviors", "--run-dir", two)
    one = private_copy(two, tmp_path / "one")
    for stage, options in SUPERVISED:
        # the discriminator's 16 triplets per process in two passes (DDP syncs on the second): still the
        # one-process step on the whole batch
        passes = ["--micro-batch-size", 8] if stage == "warmup-discriminator" else []
        torchrun(stage, "--run-dir", two, *options, *passes)
        cli(stage, "--run-dir", one, *options)
        summary = summary_of(two, stage)
        assert summary["processes"] == 2 and summary["processes_in_sync"] is True, stage
        assert json.loads((two / stage / "manifest.json").read_text())["status"] == "done"
        # the same files as the one-process run: nothing written twice, no scratch left behind
        assert sorted(p.name for p in (two / stage).iterdir()) == sorted(p.name for p in (one / stage).iterdir())
        steps = [r["step"] for r in read_jsonl(two / stage / "metrics.jsonl") if "loss/train" in r or "loss" in r]
        assert steps == sorted(set(steps)), stage
    rows = {run: [r for r in read_jsonl(run / "warmup-discriminator" / "metrics.jsonl")] for run in (one, two)}
    assert [r["step"] for r in rows[one]] == [r["step"] for r in rows[two]]
    for a, b in zip(rows[one], rows[two]):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    # a head on a frozen MiniLM: each process reads its share of the texts, then both learn from all of them
    # (a text missing from a process's cache would stop it); the heads stay in sync. Its dropout draws
    # differ per process, so the numbers are not the one-process run's.
    torchrun("warmup-discriminator", "--run-dir", two, "--backbone", "minilm", "--freeze-backbone", "--epochs", 1,
             "--max-train-rows", 120, "--force")
    frozen = summary_of(two, "warmup-discriminator")
    assert frozen["processes"] == 2 and frozen["processes_in_sync"] is True and frozen["parameters_changed"]
    # the two-process SFT policy is a policy like any other: the RL stages start from it
    torchrun("train-ppo", "--run-dir", two, "--reward-source", "rl_sources:records_each_process", *RL[:-1], 1,
             env={"RLHB_TEST_RECORD": str(tmp_path)})
    assert summary_of(two, "train-ppo")["processes_in_sync"] is True


def test_only_rank_0_writes_and_batch_sizes_must_divide(tmp_path, monkeypatch):
    from rlhb_cli import distributed, storage
    from rlhb_cli.errors import RlhbError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    storage.atomic_write_json(tmp_path / "summary.json", {"a": 1})
    with storage.atomic_dir(tmp_path / "model") as scratch:
        (scratch / "weights").write_text("x")
    assert list(tmp_path.iterdir()) == [] and not scratch.exists()  # nothing in the run dir, scratch gone
    assert distributed.per_process(8, "--batch-size") == 4
    with pytest.raises(RlhbError, match="--batch-size 7 must divide among the 2 processes"):
        distributed.per_process(7, "--batch-size")
    monkeypatch.setenv("RANK", "0")
    with storage.atomic_dir(tmp_path / "model") as staging:
        (staging / "weights").write_text("x")
    assert (tmp_path / "model" / "weights").read_text() == "x"


def test_what_deepspeed_cannot_run_is_refused_in_one_line(rl_run, cli, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # passes our own loop would add up behind DeepSpeed's back: refused
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    result = cli("train-rlhf", "--run-dir", rl_run, *RL, "--micro-batch-size", 4, "--force", ok=False)
    assert result.exit_code == 2 and "--micro-batch-size 4 is not supported under DeepSpeed" in result.output
    assert "Traceback" not in result.output
    # the judges' own loop is DDP's: refused under DeepSpeed at its start rather than training each process alone
    result = cli("warmup-discriminator", "--run-dir", rl_run, "--backbone", "tiny", "--epochs", 1, "--force", ok=False)
    assert result.exit_code == 2 and "warmup-discriminator does not run under DeepSpeed" in result.output
    assert "Traceback" not in result.output


def test_deepspeed_on_cpu_with_two_processes_is_refused_in_one_line(run):
    # accelerate would count each process of a CPU DeepSpeed launch as alone: each would train by itself
    result = torchrun("train-rlhb", "--run-dir", run, *RL, ok=False,
                    env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert result.returncode != 0
    assert "DeepSpeed on a CPU runs here as one process only" in result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("Traceback") == 1  # torchrun's own, on the children's exit
