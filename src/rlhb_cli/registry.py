"""Every stage of the pipeline, declared once: its name, what runs it, what it reads and writes.

The run directory (messages, `rlhb status`), the CLI (one command per stage), `run-all`'s default plan,
evaluation (which stages hold a policy) and the experiment runner (which stages can be an arm) all read
this table. Config classes and runners are named as "module:attribute" and imported only when a stage
is built or run, so listing stages (`rlhb status`) never loads torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """One stage: a folder of the run directory and, unless `made_by` names another, a command of its own."""

    name: str
    summary: str  # the command's help: what the stage is for
    config: str = ""  # "module:Class" of its config dataclass ("" for a folder another command makes)
    runner: str = ""  # "module:function" that runs it: function(config, stage_run) -> summary
    reads: tuple[str, ...] = ()  # upstream stages (by default; options may name others)
    writes: tuple[str, ...] = ()  # what it leaves in RUN_DIR/<name>/
    headline: tuple[str, ...] = ()  # the figures `rlhb status` and run-all show
    policy: bool = False  # leaves a policy/ that evaluation answers with
    aligner: bool = False  # a PPO aligner: can be an experiment's arm, takes --stage-name
    arm: bool = False  # an experiment's arm although no PPO aligner (train-dpo)
    renamable: bool = False  # takes --stage-name (several runs of it side by side)
    in_default_plan: bool = True  # run by `rlhb run-all` without a plan
    made_by: str = ""  # the command that makes this folder, when it is not its own (train-rlgaf)
    variant_flag: str = ""  # a boolean config field that sends the run to `variant_folder` instead
    variant_folder: str = ""
    command_line: str = ""  # how to make it, for "run this first" messages (default: rlhb NAME --run-dir ...)
    always_rerun: bool = False  # never skipped as done (a report reads whatever is there now)

    @property
    def hint(self) -> str:
        return self.command_line or f"rlhb {self.made_by or self.name} --run-dir {{run_dir}}"

    def folder_for(self, config: Any) -> str:
        """The folder a run with `config` writes (train-rlhb --no-behavior writes train-rlgaf)."""
        if self.variant_flag and getattr(config, self.variant_flag, False):
            return self.variant_folder
        return self.name


_RL = "rlhb_cli.rl.aligners"
_RL_HEADLINE = ("reward_first", "reward_final", "kl_final", "disc_collapsed", "seconds")
_RL_WRITES = ("policy/", "metrics.jsonl", "samples.jsonl", "checkpoint.pt")

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("simulate-logs", "Simulate an online platform: behaviour logs, annotator pairs, and the hidden gold judge.",
              "rlhb_cli.simulator.simulate:SimulateConfig", "rlhb_cli.simulator.simulate:run",
              writes=("logs.jsonl", "preferences.jsonl", "environment.json"),
              headline=("rows", "impressions", "bayes_ceiling_auc", "most_preferred_share")),
    StageSpec("simulate-conversations", "Simulate personas in multi-turn conversations: per-turn behaviour, implicit "
              "remarks, and ALOE's preference tree.", "rlhb_cli.simulator.conversations:ConversationsConfig",
              "rlhb_cli.simulator.conversations:run",
              writes=("personas.jsonl", "conversations.jsonl", "conversation_logs.jsonl", "preference_tree.jsonl"),
              headline=("personas", "conversations", "pairs", "ties", "remarks", "seconds"), in_default_plan=False),
    StageSpec("prepare-behaviors", "Validate, anonymise, bin and describe behaviour logs; split by query; save the "
              "data set.", "rlhb_cli.behaviors.prepare:PrepareConfig", "rlhb_cli.behaviors.prepare:run",
              reads=("simulate-logs",), writes=("dataset/", "bins.json", "behavior.json", "rejected.jsonl"),
              headline=("rows_in", "rows_kept", "rows_rejected", "rows_duplicate", "most_preferred_share_train"),
              command_line="rlhb prepare-behaviors LOGS --run-dir {run_dir}"),
    StageSpec("train-sft", "Behaviour-conditioned SFT of the starting policy on the logged triplets.",
              "rlhb_cli.stages.sft:SFTStageConfig", "rlhb_cli.stages.sft:run", reads=("prepare-behaviors",),
              writes=("policy/", "metrics.jsonl"), headline=("val_perplexity", "untrained_val_perplexity", "seconds"),
              policy=True),
    StageSpec("warmup-discriminator", "Warm up RLHB's discriminator: real triplets vs behaviour-replaced ones.",
              "rlhb_cli.stages.discriminator:DiscriminatorConfig", "rlhb_cli.stages.discriminator:run",
              reads=("prepare-behaviors", "train-sft"), writes=("model/",),
              headline=("val_auc", "bayes_ceiling_auc", "val_accuracy", "seconds")),
    StageSpec("train-classifier", "Train RLHBC's behaviour classifier: one head per metric's bin.",
              "rlhb_cli.stages.classifier:ClassifierConfig", "rlhb_cli.stages.classifier:run",
              reads=("prepare-behaviors", "train-sft"), writes=("model/",),
              headline=("mean_accuracy_gain", "macro_f1_mean", "seconds")),
    StageSpec("train-reward", "Train RLHF's reward model on preference pairs (Bradley-Terry).",
              "rlhb_cli.stages.reward:RewardConfig", "rlhb_cli.stages.reward:run",
              reads=("simulate-logs", "train-sft"), writes=("model/", "rejected.jsonl"),
              headline=("val_pairwise_accuracy", "pairs_train", "seconds")),
    StageSpec("train-rlhf", "RLHF: PPO on the reward model of train-reward.", "rlhb_cli.rl.aligners:RLHFConfig",
              f"{_RL}:run_rlhf", reads=("train-sft", "train-reward"), writes=_RL_WRITES, headline=_RL_HEADLINE,
              policy=True, aligner=True, renamable=True),
    StageSpec("train-rlhbc", "RLHBC: PPO on the behaviour classifier's expected shaped reward.",
              "rlhb_cli.rl.aligners:RLHBCConfig", f"{_RL}:run_rlhbc", reads=("train-sft", "train-classifier"),
              writes=_RL_WRITES, headline=_RL_HEADLINE, policy=True, aligner=True, renamable=True),
    StageSpec("train-rlhb", "RLHB: PPO on the discriminator's judgement of (query, response, best behaviour); "
              "--disc-steps N lets it learn alongside; --no-behavior is RLGAF (writes train-rlgaf).",
              "rlhb_cli.rl.aligners:RLHBConfig", f"{_RL}:run_rlhb", reads=("train-sft", "warmup-discriminator"),
              writes=_RL_WRITES, headline=_RL_HEADLINE, policy=True, aligner=True, renamable=True,
              variant_flag="no_behavior", variant_folder="train-rlgaf"),
    StageSpec("train-rlgaf", "RLGAF: the adversarial loop without behaviour (made by train-rlhb --no-behavior).",
              reads=("train-sft", "warmup-discriminator"), writes=_RL_WRITES, headline=_RL_HEADLINE, policy=True,
              in_default_plan=False, made_by="train-rlhb",
              command_line="rlhb train-rlhb --no-behavior --run-dir {run_dir}"),
    StageSpec("train-oracle", "TESTBED ONLY: PPO on the simulator's gold reward, the ceiling every learned reward "
              "is measured against.", "rlhb_cli.rl.aligners:OracleConfig", f"{_RL}:run_oracle",
              reads=("train-sft", "simulate-logs"), writes=_RL_WRITES, headline=_RL_HEADLINE, policy=True,
              aligner=True, renamable=True, in_default_plan=False),
    StageSpec("train-ppo", "PPO on your own reward source (--reward-source package.module:callable).",
              "rlhb_cli.rl.aligners:CustomPPOConfig", f"{_RL}:run_custom", reads=("train-sft",), writes=_RL_WRITES,
              headline=_RL_HEADLINE, policy=True, aligner=True, renamable=True, in_default_plan=False),
    StageSpec("train-dpo", "ALOE's stage: DPO on preferred and rejected replies at each turn of a conversation "
              "(trl DPOTrainer).", "rlhb_cli.stages.dpo:DPOStageConfig", "rlhb_cli.stages.dpo:run",
              reads=("simulate-conversations", "train-sft"), writes=("policy/", "metrics.jsonl", "rejected.jsonl"),
              headline=("train_pairs", "pairs_rejected", "validation_before", "validation_after", "seconds"),
              policy=True, arm=True, renamable=True, in_default_plan=False),
    StageSpec("evaluate", "Which policy do users like better? Held-out responses of every policy, judged by gold "
              "(simulated logs) and the run's judges.", "rlhb_cli.evaluation.evaluate:EvaluateConfig",
              "rlhb_cli.evaluation.evaluate:run", reads=("prepare-behaviors",),
              writes=("summary.json", "summary_detail.json", "results.jsonl"),
              headline=("headline", "queries", "seconds"), renamable=True),
    StageSpec("evaluate-personalization", "ALOE's benchmark: held-out personas talk with every policy over K turns; "
              "AL(k), IR, N-IR and N-R2 of each.", "rlhb_cli.evaluation.personalization:PersonalizationConfig",
              "rlhb_cli.evaluation.personalization:run", reads=("simulate-conversations",),
              writes=("personalization.json", "conversations.jsonl", "al_curves.png"),
              headline=("instances", "turns", "policies", "seconds"), in_default_plan=False),
    StageSpec("report", "A Markdown report with plots: did RLHB beat RLHF and RLHBC, and was training stable?",
              "rlhb_cli.evaluation.report:ReportConfig", "rlhb_cli.evaluation.report:run", reads=("evaluate",),
              writes=("report.md", "curves.png", "win_tie_loss.png"), headline=("report", "runs"), always_rerun=True),
)}

POLICY_STAGES = tuple(name for name, spec in STAGES.items() if spec.policy)
ALIGNER_COMMANDS = tuple(name for name, spec in STAGES.items() if spec.aligner)
ARM_COMMANDS = tuple(name for name, spec in STAGES.items() if spec.aligner or spec.arm)
DEFAULT_PLAN = tuple(name for name, spec in STAGES.items() if spec.in_default_plan)


def commands() -> list[str]:
    """The stages that are commands of their own (train-rlgaf is train-rlhb's)."""
    return [name for name, spec in STAGES.items() if not spec.made_by]


def rerun_hint(stage: str, run_dir: Any) -> str:
    """The command that makes `stage` in `run_dir`."""
    spec = STAGES.get(stage)
    return (spec.hint if spec else f"rlhb {stage} --run-dir {{run_dir}}").format(run_dir=run_dir)


def resolve(reference: str) -> Any:
    """The attribute named "module:attribute" (a config class or a runner)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def config_class(command: str) -> type:
    return resolve(STAGES[command].config)


def runner(command: str):
    return resolve(STAGES[command].runner)
