"""LoRA: one frozen base for actor, reference and critic; adapters that learn, resume, and load as a policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import RL, read_jsonl, summary_of, without_time

TESTS = Path(__file__).parent


def test_the_reference_is_exactly_the_base_with_its_adapters_off(rl_base):
    from rlhb_cli.models.load import load_causal_lm
    from rlhb_cli.models.lora import attach_lora
    from rlhb_cli.rl.actor_critic import reference_logits
    from rlhb_cli.config import build_config
    from rlhb_cli.rl.config import EngineConfig
    base, tokenizer = load_causal_lm(rl_base / "train-sft" / "policy", [])
    actor = attach_lora(load_causal_lm(rl_base / "train-sft" / "policy", [])[0], build_config(EngineConfig, None, {"lora_r": 4}).lora)
    torch.manual_seed(0)
    for name, parameter in actor.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapters something to change
            parameter.data.normal_(std=0.5)
    encoded = tokenizer(["What is the capital of France?", "How do I boil an egg?"], padding=True,
                        return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(1) - mask).clamp(min=0)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        reference = reference_logits(None, actor, ids, mask, positions)
        adapted = actor(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    assert torch.equal(reference, expected)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_lora_ppo_learns_a_reward(rl_run, cli, monkeypatch):
    run = rl_run
    monkeypatch.chdir(TESTS)
    cli("train-ppo", "--run-dir", run, "--reward-source", "rl_sources:pays_for_the", "--iterations", 16,
        "--prompts-per-iteration", 16, "--rollouts", 1, "--minibatch-size", 16, "--max-new-tokens", 16,
        "--learning-rate", 1e-2, "--sample-every", 0, "--lora-r", 8)
    count = [r["objective/reward_mean"] for r in read_jsonl(run / "train-ppo" / "metrics.jsonl")]
    assert np.mean(count[-4:]) > 2 * np.mean(count[:4]), count
    summary = summary_of(rl_run, "train-ppo")
    assert summary["trainable_parameters"] < summary["policy_parameters"] / 5


def test_lora_rlhb_checkpoints_adapters_only_resumes_and_evaluates(rl_run, cli):
    run = rl_run
    args = ["--iterations", 4, *RL, "--lora-r", 4, "--checkpoint-every", 2, "--disc-steps", 2]
    twin = run.parent / "twin"
    shutil.copytree(rl_run, twin)
    cli("train-rlhb", "--run-dir", run, *args)
    cli("train-rlhb", "--run-dir", twin, *args, "--stop-after-steps", 2)
    cli("train-rlhb", "--run-dir", twin, *args, "--resume")
    first = without_time(read_jsonl(run / "train-rlhb" / "metrics.jsonl"))
    assert len(first) == 4 and first == without_time(read_jsonl(twin / "train-rlhb" / "metrics.jsonl"))
    checkpoint = torch.load(run / "train-rlhb" / "checkpoint.pt", weights_only=False)
    assert checkpoint["model"] and all("lora_" in k or k.startswith("value_head.") for k in checkpoint["model"])
    manifest = json.loads((run / "train-rlhb" / "manifest.json").read_text())
    assert manifest["config"]["critic"] == "shared"
    assert manifest["torch_threads"] == torch.get_num_threads()  # float sums, hence numbers, depend on it
    policy = run / "train-rlhb" / "policy"
    assert (policy / "adapter_config.json").exists() and not (policy / "model.safetensors").exists()
    assert json.loads((policy / "policy.json").read_text())["lora_base"] == "train-sft/policy"
    moved = run.parent / "moved"
    shutil.move(rl_run, moved)  # the base is found relative to the run dir
    cli("evaluate", "--run-dir", moved, "--samples", 1, "--max-new-tokens", 8, "--following-queries", 0,
        "--bootstrap-samples", 20)
    assert "train-rlhb" in summary_of(moved, "evaluate")["policies"]
    result = cli("train-rlhb", "--run-dir", moved, *args, "--critic", "separate", "--force", ok=False)
    assert result.exit_code == 2 and "use --critic shared" in result.output

    # exported: adapters merged into a plain model that a Python without rlhb loads and prompts as trained
    exported = run.parent / "exported"
    cli("export", "--run-dir", moved, "--stage", "train-rlhb", "--out", exported)
    assert (exported / "model.safetensors").exists() and not (exported / "adapter_config.json").exists()
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## How to prompt it" in card
    assert "| gold | simulator's gold |" in card  # the run's evaluation of this policy
    prompt = json.loads((exported / "rlhb_prompt.json").read_text())
    assert prompt["format"] == "plain" and prompt["prompt_example"].endswith("Answer:")
    script = ("import json, sys; sys.modules['rlhb_cli'] = None  # rlhb cannot be imported\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "folder = sys.argv[1]; tokenizer = AutoTokenizer.from_pretrained(folder)\n"
              "model = AutoModelForCausalLM.from_pretrained(folder)\n"
              "ids = tokenizer(json.load(open(folder + '/rlhb_prompt.json'))['prompt_example'], return_tensors='pt')\n"
              "out = model.generate(**ids, max_new_tokens=6, do_sample=False)\n"
              "print(len(out[0]) > ids['input_ids'].shape[1])")
    loaded = subprocess.run([sys.executable, "-c", script, str(exported)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "True", loaded.stderr[-2000:]
    refused = cli("export", "--run-dir", moved, "--stage", "train-rlhb", "--out", exported, ok=False)
    assert refused.exit_code != 0 and "exists and is not empty" in refused.output


def test_the_discriminator_can_learn_through_adapters_of_its_own(rl_run, cli):
    run = rl_run
    args = ["--iterations", 3, *RL, "--disc-steps", 2, "--disc-learning-rate", 1e-3, "--disc-lora-r", 4,
            "--checkpoint-every", 1]
    twin = run.parent / "twin"
    shutil.copytree(run, twin)
    cli("train-rlhb", "--run-dir", run, *args)
    rows = read_jsonl(run / "train-rlhb" / "metrics.jsonl")
    assert all("disc/loss" in r for r in rows)
    cli("train-rlhb", "--run-dir", twin, *args, "--stop-after-steps", 2)
    cli("train-rlhb", "--run-dir", twin, *args, "--resume")
    assert without_time(read_jsonl(twin / "train-rlhb" / "metrics.jsonl")) == without_time(rows)
    source = torch.load(run / "train-rlhb" / "checkpoint.pt", weights_only=False)["source"]["model"]
    assert source and all("lora_" in k or "modules_to_save" in k for k in source), sorted(source)[:5]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in source.items())  # the adapters learned
    assert "LoRA adapters of rank 4" in " ".join(summary_of(run, "train-rlhb")["notes"])
