"""The command line itself: help, recipes, and errors that are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhb_cli.config import build_config
from rlhb_cli.errors import RlhbError
from rlhb_cli.simulator.simulate import SimulateConfig


def test_help_lists_every_stage_with_its_purpose(cli):
    out = cli("--help").output
    for stage in ("simulate-logs", "import", "prepare-behaviors", "train-sft", "warmup-discriminator",
                  "train-classifier", "train-reward", "train-rlhf", "train-rlhbc", "train-rlhb", "train-oracle",
                  "train-ppo", "evaluate", "report", "run-all", "status"):
        assert stage in out
    assert "Validate, anonymise, bin" in out


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "rlhb_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "prepare-behaviors" in result.stdout


def test_version_completion_and_status_as_json_for_scripts(cli, small_sim):
    from importlib.metadata import version
    assert cli("--version").output.strip() == f"rlhb {version('rlhb-cli')}"
    rlhb = str(Path(sys.executable).parent / "rlhb")  # the installed command, as a shell completes it
    # bash's script asked for by name: `--show-completion` ignores its argument and detects the parent shell,
    # which a run under nohup or a CI runner may not have
    script = subprocess.run([rlhb], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, _RLHB_COMPLETE="source_bash"))
    assert script.returncode == 0 and "_RLHB_COMPLETE=complete_bash" in script.stdout
    words = subprocess.run([rlhb], capture_output=True, text=True, timeout=120, env=dict(
        os.environ, _RLHB_COMPLETE="complete_bash", COMP_WORDS="rlhb train-r", COMP_CWORD="1"))
    assert set(words.stdout.split()) == {"train-reward", "train-rlhf", "train-rlhbc", "train-rlhb"}
    rows = json.loads(cli("status", "--run-dir", small_sim, "--json").output)
    assert rows["run_dir"] == str(small_sim)
    states = {row["stage"]: row["state"] for row in rows["stages"]}
    assert states["simulate-logs"] == "done" and states["train-sft"] == "missing"
    done = next(row for row in rows["stages"] if row["stage"] == "simulate-logs")
    assert done["headline"]["impressions"] == 200_000 and done["finished_at"]


def test_recipe_fills_config_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("queries: 50\nimpressions: 1000\n")
    config = build_config(SimulateConfig, recipe, {"impressions": 2000, "seed": None})
    assert (config.queries, config.impressions, config.seed) == (50, 2000, 0)


@pytest.mark.parametrize("text, message", [
    ("querys: 5\n", "unknown key(s) querys"),
    ("queries: many\n", "'queries' must be int"),
    ("queries: 0\n", "queries must be at least 1"),
    ("- 1\n", "a recipe is a mapping"),
    ("queries: [\n", "not valid YAML"),
])
def test_bad_recipes_are_refused_clearly(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RlhbError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_config(SimulateConfig, recipe, {})


def test_bad_option_values_end_in_one_line(cli, tmp_path):
    result = cli("simulate-logs", "--out", tmp_path / "x", "--queries", 100000, ok=False)
    assert result.exit_code == 2 and "lower --queries" in result.output and "Traceback" not in result.output
    result = cli("prepare-behaviors", tmp_path / "x.jsonl", "--run-dir", tmp_path, "--behavior-basis", "ranks", ok=False)
    assert result.exit_code == 2 and "behavior_basis must be rates or counts" in result.output
    result = cli("simulate-logs", ok=False)
    assert "give exactly one of --out DIR or --run-dir DIR" in result.output


def test_run_all_runs_a_plan_in_order_and_skips_what_is_done(cli, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("simulate-logs: {queries: 40, eval_queries: 10, impressions: 20000}\n"
                    "prepare-behaviors: {bins: 3}\n")
    run_dir = tmp_path / "run"
    out = cli("run-all", "--run-dir", run_dir, "--config", plan).output
    assert out.index("simulate-logs ->") < out.index("prepare-behaviors ->")
    assert (run_dir / "prepare-behaviors" / "dataset").exists()
    again = cli("run-all", "--run-dir", run_dir, "--config", plan).output
    assert "already done" in again
    plan.write_text("train-everything: {}\n")
    result = cli("run-all", "--run-dir", run_dir, "--config", plan, ok=False)
    assert result.exit_code == 2 and "unknown stage 'train-everything'" in result.output
    plan.write_text("prepare-behaviors: {bins: 0}\n")
    result = cli("run-all", "--run-dir", run_dir, "--config", plan, ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_field_added_since_at_its_default_keeps_a_stage_done():
    from rlhb_cli.config import build_config, config_to_dict, same_config
    from rlhb_cli.rl.aligners import RLHBConfig
    config = RLHBConfig()
    recorded = config_to_dict(config)
    assert same_config(recorded, config)
    older = {k: v for k, v in recorded.items() if k not in ("lora_r", "gradient_checkpointing")}
    assert same_config(older, config)  # recorded before those options existed; they are at their defaults
    assert not same_config(older, build_config(RLHBConfig, None, {"lora_r": 8}))
    assert not same_config({**recorded, "iterations": 7}, config)
    assert not same_config(None, config)


def test_contrast_metrics_are_checked_by_name():
    from rlhb_cli.rl.aligners import RLHBConfig
    assert RLHBConfig(contrast_metrics="likes, dislikes").contrast_metrics == "likes, dislikes"
    for bad, message in (("likes,shares", "shares is not one of pv, clicks, likes, dislikes"),
                         ("likes,", "an empty name")):
        with pytest.raises(ValueError, match=message):
            RLHBConfig(contrast_metrics=bad)
    with pytest.raises(ValueError, match="needs reward_form contrast"):
        RLHBConfig(contrast_metrics="likes", reward_form="probability")


def test_the_command_line_is_offline_before_any_hub_library_loads():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; the CLI's module imports transformers (through
    its stages), so the default must be set before that, not in main()."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "TRANSFORMERS_VERBOSITY")}
    code = ("import rlhb_cli.cli, sys, huggingface_hub.constants as c; "
            "assert 'transformers' in sys.modules; print(c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_the_engine_config_nests_its_groups_and_keeps_flat_flags_and_keys(tmp_path):
    """config.kl.coef in code; --kl-coef, the YAML key kl_coef and the manifest's kl_coef outside."""
    from rlhb_cli.config import build_config, config_to_dict, flat_fields
    from rlhb_cli.rl.aligners import RLHBConfig, RLHFConfig
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("kl_coef: 0.2\nlora_r: 4\nppo_epochs: 2\nprobe_every: 5\nreward_clip: 1.5\n")
    config = build_config(RLHBConfig, recipe, {"learning_rate": 1e-4, "kl_coef": None})
    assert (config.kl.coef, config.lora.r, config.ppo.epochs, config.probe.every, config.shaping.clip) == \
        (0.2, 4, 2, 5, 1.5)
    assert config.ppo.learning_rate == 1e-4 and config.ppo.critic == "shared"  # the LoRA default resolved
    flat = config_to_dict(config)
    assert flat["kl_coef"] == 0.2 and flat["lora_r"] == 4 and "kl" not in flat and "ppo" not in flat
    # the variant's own defaults of a group: RLHB's contrast reward is scaled, RLHF's is not
    assert (config.shaping.scale, config.shaping.length_debias) == (0.05, True)
    assert (RLHFConfig().shaping.scale, RLHFConfig().shaping.length_debias) == (1.0, False)
    assert "Default: 0.05 for contrast" in flat_fields(RLHBConfig)["reward_scale"].help
    assert "Default: 0.05" not in flat_fields(RLHFConfig)["reward_scale"].help
    recipe.write_text("kl: {coef: 0.2}\n")
    with pytest.raises(RlhbError, match="unknown key\\(s\\) kl for RLHBConfig; known: .*kl_coef"):
        build_config(RLHBConfig, recipe)
    assert RLHBConfig().kl is not RLHBConfig().kl  # each config its own groups
