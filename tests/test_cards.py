"""Model cards: every policy and judge folder gets a Hugging Face README.md when its stage ends, and the
run's evaluation adds its figures to the evaluated policies' cards without making their stages stale."""

from __future__ import annotations

import json

import yaml

from conftest import RL
from rlhb_cli import rundir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_every_model_folder_has_a_card_that_grows_with_its_evaluation(rl_run, cli):
    for stage, folder in (("warmup-discriminator", "model"), ("train-classifier", "model"),
                          ("train-reward", "model"), ("train-sft", "policy")):
        card = (rl_run / stage / folder / "README.md").read_text()
        meta = front_matter(card)
        assert {"rlhb", stage}.issubset(meta["tags"]) and meta["license"] == "other", stage
        assert "base_model" not in meta  # the tiny models are built here, from no Hub model
        logs = json.loads((rl_run / "prepare-behaviors" / "manifest.json").read_text())["inputs"]["logs"]
        assert f"sha256 {logs['sha256']}" in card and "## Its configuration" in card
        config = json.loads(card.split("## Its configuration")[1].split("```json")[1].split("```")[0])
        assert config == json.loads((rl_run / stage / "manifest.json").read_text())["config"]
    assert "## How to prompt it" in (rl_run / "train-sft" / "policy" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in (rl_run / "train-reward" / "model" / "README.md").read_text()

    cli("train-oracle", "--run-dir", rl_run, "--iterations", 1, *RL)
    card = (rl_run / "train-oracle" / "policy" / "README.md").read_text()
    assert "train-oracle" in front_matter(card)["tags"] and "## Evaluation" not in card
    assert "README.md" not in json.loads((rl_run / "train-oracle" / "manifest.json").read_text())["outputs"]
    cli("evaluate", "--run-dir", rl_run, "--policies", "train-sft", "--policies", "train-oracle", "--samples", 1,
        "--max-new-tokens", 8, "--following-queries", 0, "--bootstrap-samples", 20)
    card = (rl_run / "train-oracle" / "policy" / "README.md").read_text()
    gold = json.loads((rl_run / "evaluate" / "summary_detail.json").read_text())["scores"]["train-oracle"]["sampled"]["gold"]
    assert f"| gold | simulator's gold | {gold['mean']:+.4f}" in card
    assert "| discriminator | gold-free (trained on the logs) |" in card
    assert "(baseline)" in (rl_run / "train-sft" / "policy" / "README.md").read_text()
    assert rundir.stage_state(rl_run / "train-oracle", verify=True)[0] == "done"  # a card is not an output
