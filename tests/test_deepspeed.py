"""The training stages under DeepSpeed ZeRO-2 and ZeRO-3, one process on CPU (DeepSpeed's CPU accelerator, gloo).

accelerate counts a CPU DeepSpeed launch of several processes as one process each, so only one process
runs here: what it checks is the DeepSpeed code path itself (its engine owns backward, clipping and the
optimizer step; its optimizer state is ZeRO's; at ZeRO-3 the weights are sharded from loading on, and
every read outside a forward pass must gather them), not sharding across processes. Skipped without
deepspeed (`make test-deepspeed` installs it and runs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY, read_jsonl, summary_of, torchrun, without_time

pytest.importorskip("deepspeed")

RL = ["--prompts-per-iteration", 8, "--rollouts", 1, "--minibatch-size", 8, "--max-new-tokens", 10,
      "--sample-every", 0, "--iterations", 3, "--disc-steps", 2, "--disc-learning-rate", 1e-3]
STAGES = pytest.mark.parametrize("stage", [2, 3])


def zero(stage: int, *args, ok: bool = True) -> subprocess.CompletedProcess:
    """`rlhb ARGS` in one process under DeepSpeed ZeRO-`stage`, as `accelerate launch` with such a config runs it."""
    return torchrun(*args, processes=1, ok=ok, env={"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu",
                                             "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
                                             "ACCELERATE_GRADIENT_CLIPPING": "1.0"})


def close(a: list[dict], b: list[dict], rel: float) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=rel, abs=1e-6) for k in x
                                     if isinstance(x[k], float) and not k.startswith("time/"))
        for x, y in zip(a, b))


def weights_of(directory: Path) -> dict:
    from safetensors.torch import load_file
    files = list(directory.glob("*.safetensors"))
    assert len(files) == 1, f"{directory} holds {[f.name for f in directory.iterdir()]}, not one file of weights"
    return load_file(files[0])


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    # (Trainer under DeepSpeed saves the LM head tied to the embeddings as a tensor of its own)
    assert (a.keys() ^ b.keys()) <= {"lm_head.weight"}
    common = a.keys() & b.keys()
    assert common and all(a[k].shape == b[k].shape for k in common)  # whole tensors, not shards
    assert max(float((a[k] - b[k]).abs().max()) for k in common) <= atol


@STAGES
def test_train_rlhb_under_zero_learns_as_without_it_and_resumes_exactly(rl_run, cli, stage):
    cli("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "plain")
    zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "zero")
    plain = read_jsonl(rl_run / "plain" / "metrics.jsonl")
    under = read_jsonl(rl_run / "zero" / "metrics.jsonl")
    # DeepSpeed's optimizer (flat fp32 partitions) and its one global clip: the same run up to rounding
    assert close(plain, under, rel=1e-2) and without_time(plain) != without_time(under)
    summary = summary_of(rl_run, "zero")
    assert any("under DeepSpeed" in note for note in summary["notes"])
    assert summary["policy_parameters"] == summary_of(rl_run, "plain")["policy_parameters"]  # whole, not a shard
    # the policy is saved whole (at ZeRO-3 gathered from its shards), the plain run's weights up to rounding
    assert_same_weights(weights_of(rl_run / "zero" / "policy"), weights_of(rl_run / "plain" / "policy"), 1e-4)
    # ZeRO's sharded optimizer state goes into the checkpoint and comes back: the uninterrupted run's numbers
    zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--stop-after-steps", 2)
    assert len(read_jsonl(rl_run / "resumed" / "metrics.jsonl")) == 2
    # (a sharded checkpoint does not resume without DeepSpeed: said in one line, the checkpoint kept)
    result = cli("train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--resume", ok=False)
    assert result.exit_code == 2 and f"written under DeepSpeed ZeRO-{stage}, so its optimizer state" in result.output
    # (nor under the other ZeRO stage, whose optimizer state is laid out otherwise)
    other = zero(5 - stage, "train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--resume", ok=False)
    assert other.returncode != 0 and f"resume it under DeepSpeed ZeRO-{stage}" in other.stderr
    zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "resumed", "--resume")
    assert without_time(read_jsonl(rl_run / "resumed" / "metrics.jsonl")) == without_time(under)
    assert_same_weights(weights_of(rl_run / "resumed" / "policy"), weights_of(rl_run / "zero" / "policy"), 0.0)
    if stage == 3:  # generation from each layer's own gathering (a policy too large for one device): the same samples
        zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--stage-name", "layerwise", "--no-gather-for-generation")
        assert without_time(read_jsonl(rl_run / "layerwise" / "metrics.jsonl")) == without_time(under)
        assert any("ZeRO-3" in note for note in summary_of(rl_run, "layerwise")["notes"])


@STAGES
def test_lora_train_rlhb_under_zero_learns_the_plain_runs_adapters(rl_run, cli, stage):
    cli("train-rlhb", "--run-dir", rl_run, *RL, "--lora-r", 4, "--stage-name", "lora-plain")
    zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--lora-r", 4, "--stage-name", "lora")
    summary = summary_of(rl_run, "lora")
    assert summary["iterations"] == 3 and summary["trainable_parameters"] < summary["policy_parameters"]
    adapters = weights_of(rl_run / "lora" / "policy")
    assert adapters and all("lora_" in name for name in adapters)  # the adapters alone, over the base on disk
    assert_same_weights(adapters, weights_of(rl_run / "lora-plain" / "policy"), 1e-4)
    # a LoRA policy as the start: its adapters merged into its base (at ZeRO-3 a base sharded as it loads)
    zero(stage, "train-rlhb", "--run-dir", rl_run, *RL, "--init-from", "lora", "--stage-name", "on-lora")
    cli("train-rlhb", "--run-dir", rl_run, *RL, "--init-from", "lora", "--stage-name", "on-lora-plain")
    first = [read_jsonl(rl_run / name / "metrics.jsonl")[0] for name in ("on-lora", "on-lora-plain")]
    assert first[0]["objective/reward_mean"] == pytest.approx(first[1]["objective/reward_mean"], rel=1e-4)


@STAGES
def test_train_sft_and_train_reward_under_zero_match_the_plain_run(sim_run, tmp_path, cli, stage):
    cli("prepare-behaviors", "--run-dir", sim_run)
    twin = tmp_path / "twin"
    shutil.copytree(sim_run, twin)
    sft = ["--epochs", 1, "--max-train-rows", 1000, "--learning-rate", 1e-2, *TINY]
    cli("train-sft", "--run-dir", sim_run, *sft)
    zero(stage, "train-sft", "--run-dir", twin, *sft)
    plain, under = summary_of(sim_run, "train-sft"), summary_of(twin, "train-sft")
    assert under["val_perplexity"] == pytest.approx(plain["val_perplexity"], rel=1e-3)
    # transformers evaluates a model before its training under DeepSpeed only at ZeRO-3, which then cannot
    # train it: said, not faked
    assert under["untrained_val_perplexity"] is None and any("ZeRO-3" in n for n in under["notes"])
    # the policy is whole weights that later stages load (Trainer alone would leave a DeepSpeed checkpoint at ZeRO-3)
    assert_same_weights(weights_of(twin / "train-sft" / "policy"), weights_of(sim_run / "train-sft" / "policy"), 1e-3)
    cli("train-reward", "--run-dir", sim_run, "--backbone", "tiny", "--epochs", 1)
    zero(stage, "train-reward", "--run-dir", twin, "--backbone", "tiny", "--epochs", 1)
    plain, under = summary_of(sim_run, "train-reward"), summary_of(twin, "train-reward")
    assert under["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-2)
    assert under["val_pairwise_accuracy"] == pytest.approx(plain["val_pairwise_accuracy"], abs=0.05)
    assert_same_weights(weights_of(twin / "train-reward" / "model"), weights_of(sim_run / "train-reward" / "model"), 1e-3)
    assert json.loads((twin / "train-reward" / "manifest.json").read_text())["status"] == "done"
