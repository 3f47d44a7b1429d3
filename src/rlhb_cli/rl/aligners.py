"""The aligner stages: the one PPO engine with the reward source that names each.

  train-rlhf    reward model of train-reward (annotated preference pairs)
  train-rlhbc   behaviour classifier of train-classifier (expected shaped reward)
  train-rlhb    discriminator of warmup-discriminator, updated as the policy learns;
                with --no-behavior it is RLGAF (the adversarial loop on (query, response) alone)
  train-oracle  TESTBED ONLY: the simulator's gold user model, the ceiling for the others
  train-ppo     a user's own reward source, `--reward-source package.module:callable`
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from rlhb_cli import rundir
from rlhb_cli.behaviors.binning import METRICS
from rlhb_cli.behaviors.prepare import load_prepared
from rlhb_cli.behaviors.text import best_logged
from rlhb_cli.config import config_to_dict, field, group
from rlhb_cli.distributed import param_count, seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.discriminator import Discriminator
from rlhb_cli.models.judge import BODY_LEARNING_KEYS, Judge, JudgeMeta, attach_judge_lora
from rlhb_cli.models.load import load_sequence_classifier, policy_source
from rlhb_cli.rl.config import EngineConfig, RewardShaping
from rlhb_cli.rl.discriminator_source import AdversarialSettings, DiscriminatorSource
from rlhb_cli.rl.ppo import PPOEngine
from rlhb_cli.rl.sources import (ClassifierSource, ConversationOracleSource, OracleSource, RewardModelSource,
                                 load_custom)


@dataclass
class RLHFConfig(EngineConfig):
    reward_model: str = field("train-reward", help="The reward model: the train-reward stage of this run dir, or a "
                                                   "path to a saved rlhb judge.")


@dataclass
class RLHBCConfig(EngineConfig):
    classifier: str = field("train-classifier", help="The behaviour classifier: the train-classifier stage, or a "
                                                     "path to a saved rlhb judge.")
    head_weights: list[str] = field(factory=list, help="Weighted heads instead of the shaped reward, e.g. likes=1 "
                                                       "dislikes=-1 clicks=0.2: sum w*E[metric] / (E[pv] + E[clicks]).")

    def __post_init__(self):
        super().__post_init__()
        self.weights()

    def weights(self) -> dict[str, float] | None:
        out = {}
        for item in self.head_weights:
            name, _, value = item.partition("=")
            try:
                out[name] = float(value)
            except ValueError:
                raise ValueError(f"head_weights: {item!r} is not metric=number") from None
            if name not in METRICS:
                raise ValueError(f"head_weights: {name!r} is not a metric ({', '.join(METRICS)})")
        return out or None


_SCALE_HELP = ("Multiply the discriminator's reward by this. Default: 0.05 for contrast (it spans a few logits, ten "
               "times the gold reward's spread, so the KL penalty stays in proportion), else 1.")
_DEBIAS_HELP = ("Remove each iteration's linear trend of reward in response length. Default: on for RLHB (the "
                "discriminators pay for short answers, gold does not; measured: three seeds all gained with it, one "
                "lost without), off with --no-behavior.")


@dataclass
class RLHBConfig(EngineConfig):
    discriminator: str = field("warmup-discriminator", help="The warmed-up discriminator: the warmup-discriminator "
                                                            "stage, or a path to a saved rlhb judge.")
    no_behavior: bool = field(False, help="RLGAF: the adversarial loop on (query, response) alone; the "
                                          "discriminator's body gets a fresh real/fake head.")
    reward_form: Optional[str] = field(None, help="probability: D(q, r, b); log_probability: log D; contrast: logit "
                                                  "D(q, r, b) minus the mean logit over other behaviours of the "
                                                  "query. Default: contrast, or probability with --no-behavior.")
    contrast_behaviors: int = field(8, help="contrast: behaviours to contrast with (the query's logged ones first).")
    contrast_metrics: str = field("", help="contrast with a factorized discriminator: the metrics whose parts make "
                                           "the reward, comma-separated from pv, clicks, likes, dislikes (empty: "
                                           "all, with the behaviours' marginals). likes,dislikes leaves out the "
                                           "views and clicks the target asks for, which the shaped reward "
                                           "divides by (measured: no gain over all metrics, docs/results.md).")
    disc_learning_rate: float = field(1e-5, help="Discriminator learning rate during RL.")
    shaping: RewardShaping = group(lambda: RewardShaping(scale=None, length_debias=None), help="Reward shaping.",
                                   help_overrides={"reward_scale": _SCALE_HELP, "length_debias": _DEBIAS_HELP})
    disc_steps: Optional[int] = field(None, help="Discriminator optimizer steps per update. Default: 0 for RLHB (the "
                                                 "warmed-up discriminator stays frozen: measured best on the simulated "
                                                 "testbed), 2 with --no-behavior (its new head must learn); 2 gives "
                                                 "RLHB the paper's alternating updates.")
    disc_batch_size: int = field(32, help="Triplets per discriminator step.")
    frozen_iterations: int = field(0, help="Iterations with the discriminator frozen before its updates start.")
    update_every: int = field(1, help="Iterations between discriminator updates.")
    bootstrap_ratio: float = field(0.0, help="Share of generated triplets with the highest rewards relabelled real "
                                             "(the paper reports collapse at 0.5).")
    label_smoothing: float = field(0.0, help="Discriminator targets 1 - s and s.")
    replaced_negatives: float = field(3.0, help="Behaviour-replaced real triplets per generated one among the fakes "
                                                "(they keep the discriminator reading behaviour, not only realism).")
    likelihood_weight: float = field(1.0, help="Factorized discriminator: weight of its bins' likelihood on real rows.")
    real_min_reward_quantile: float = field(0.0, help="Real side: only logged rows above this shaped-reward quantile "
                                                      "(RLGAF's 'good' responses; 0: all).")
    source_warmup_rounds: Optional[int] = field(None, help="Discriminator updates on the starting policy's text "
                                                           "before PPO. Default: 8 with --no-behavior, else 0.")
    disc_lora_r: int = field(0, help="The discriminator learns through LoRA adapters of this rank on its own "
                                     "frozen base, its head in full (0: every weight learns).")
    collapse_threshold: float = field(0.95, help="A learning discriminator whose fake score stays above this ...")
    collapse_iterations: int = field(5, help="... for this many iterations is reported as collapsed.")

    def __post_init__(self):
        # Defaults that depend on the variant are resolved here, so the manifest records the values used.
        if self.reward_form is None:
            self.reward_form = "probability" if self.no_behavior else "contrast"
        if self.shaping.scale is None:
            self.shaping.scale = 0.05 if self.reward_form == "contrast" else 1.0
        if self.shaping.length_debias is None:
            self.shaping.length_debias = not self.no_behavior
        if self.disc_steps is None:
            self.disc_steps = 2 if self.no_behavior else 0
        if self.source_warmup_rounds is None:
            self.source_warmup_rounds = 8 if self.no_behavior else 0
        super().__post_init__()
        if self.reward_form not in ("probability", "log_probability", "contrast"):
            raise ValueError(f"reward_form must be probability, log_probability or contrast, got {self.reward_form!r}")
        if self.no_behavior and self.reward_form == "contrast":
            raise ValueError("reward_form contrast compares behaviours; with --no-behavior use probability or "
                             "log_probability")
        if self.contrast_metrics:
            chosen = [m.strip() for m in self.contrast_metrics.split(",")]
            unknown = [m for m in chosen if m not in METRICS]
            if unknown or not all(chosen):
                raise ValueError(f"contrast_metrics: {', '.join(unknown) or 'an empty name'} is not one of "
                                 f"{', '.join(METRICS)}")
            if self.reward_form != "contrast":
                raise ValueError("contrast_metrics needs reward_form contrast")
        if not 0 <= self.bootstrap_ratio <= 1:
            raise ValueError(f"bootstrap_ratio must be in [0, 1], got {self.bootstrap_ratio}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.disc_lora_r < 0:
            raise ValueError(f"disc_lora_r must be >= 0, got {self.disc_lora_r}")
        if not 0 <= self.real_min_reward_quantile < 1:
            raise ValueError(f"real_min_reward_quantile must be in [0, 1), got {self.real_min_reward_quantile}")


@dataclass
class OracleConfig(EngineConfig):
    """TESTBED ONLY: PPO on the simulator's gold reward."""


@dataclass
class CustomPPOConfig(EngineConfig):
    reward_source: str = field("", help="Your reward source: package.module:callable returning an object with "
                                        "score(queries, responses, behaviors) -> (rewards, logs).")

    def __post_init__(self):
        super().__post_init__()
        if not self.reward_source:
            raise ValueError("give --reward-source package.module:callable")


# ------------------------------------------------------------------------------------------------ running
def build_engine(config: EngineConfig, stage: rundir.StageRun, make_source: Callable, label: str):
    """(engine, fingerprint, policy meta) of an aligner: its inputs checked and recorded, its models loaded."""
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    data, spec, template = load_prepared(run_dir, stage)
    policy_path = policy_source(config.init_from, run_dir, stage, "starting policy")
    target = None  # --condition none
    if config.condition == "most_preferred":
        target = template.most_preferred(spec)
    elif config.condition == "best_logged":
        target = best_logged(data["train"]["behavior_text"], data["train"]["shaped_reward"], config.condition_min_rows)
    notes: list[str] = []
    source = make_source(run_dir, data, spec, template, notes)
    engine = PPOEngine(config, policy_path, source, stage, list(data["train"]["query"]),
                       list(data["validation"]["query"]), lambda query: target, notes)
    engine.notes = notes
    fingerprint = hashlib.sha256(json.dumps([config_to_dict(config), stage.manifest["upstream"],
                                             stage.manifest["inputs"]], sort_keys=True).encode()).hexdigest()
    policy_meta = {"stage": stage.stage, "aligner": label, "condition": config.condition, "behavior_text": target,
                   "prompt_format": engine.prompt_format.kind, "init_from": config.init_from}
    return engine, fingerprint, policy_meta


def run_aligner(config: EngineConfig, stage: rundir.StageRun, make_source: Callable, label: str,
                warmup_rounds: int = 0) -> dict:
    """Shared body of every aligner: inputs, the engine, the run, the summary."""
    started = time.perf_counter()
    engine, fingerprint, policy_meta = build_engine(config, stage, make_source, label)
    summary = engine.train(fingerprint, policy_meta, warmup_rounds)
    return {"aligner": label, "reward_source": engine.source.name} | summary | {
        "condition": config.condition, "behavior_text": policy_meta["behavior_text"], "init_from": config.init_from,
        "policy_parameters": param_count(engine.unwrapped.actor),
        "trainable_parameters": param_count(engine.unwrapped, trainable_only=True),
        "notes": engine.notes, "seconds": round(time.perf_counter() - started, 1)}


def run_rlhf(config: RLHFConfig, stage: rundir.StageRun) -> dict:
    def make(run_dir, data, spec, template, notes):
        return RewardModelSource(rundir.stage_or_path(config.reward_model, run_dir, stage, "model", "reward model"))
    return run_aligner(config, stage, make, "RLHF")


def run_rlhbc(config: RLHBCConfig, stage: rundir.StageRun) -> dict:
    def make(run_dir, data, spec, template, notes):
        path = rundir.stage_or_path(config.classifier, run_dir, stage, "model", "behaviour classifier")
        return ClassifierSource(path, config.weights())
    return run_aligner(config, stage, make, "RLHBC")


def rlhb_source_factory(config: RLHBConfig, stage: rundir.StageRun) -> Callable:
    def make(run_dir, data, spec, template, notes):
        path = rundir.stage_or_path(config.discriminator, run_dir, stage, "model", "discriminator")
        warmed = Judge.load(path)
        if config.no_behavior:  # RLGAF: the warmed-up body, a fresh head reading (query, response) alone
            model, tokenizer = load_sequence_classifier(path, 1, notes)
            extra = {"form": "joint"} | {k: v for k, v in warmed.meta.extra.items() if k in BODY_LEARNING_KEYS}
            judge = Judge(model, tokenizer, JudgeMeta(kind="discriminator", max_length=warmed.meta.max_length,
                                                      with_behavior=False, extra=extra))
            notes.append("RLGAF: the discriminator's body comes from the warm-up, its real/fake head is new")
        else:
            judge = warmed
        if config.disc_lora_r:
            if judge.frozen_body:
                raise RlhbError(f"{path}: this discriminator learns its head alone on a frozen body; "
                                f"--disc-lora-r would train the body: leave it at 0")
            judge.model = attach_judge_lora(judge.model, config.disc_lora_r, config.lora.alpha)
            notes.append(f"the discriminator learns through LoRA adapters of rank {config.disc_lora_r}")
        train = data["train"]
        real_rows = None
        if config.real_min_reward_quantile > 0:
            reward = np.asarray(train["shaped_reward"])
            real_rows = np.flatnonzero(reward > np.quantile(reward, config.real_min_reward_quantile))
        settings = AdversarialSettings(
            config.reward_form, config.contrast_behaviors, config.disc_learning_rate, config.disc_steps,
            config.disc_batch_size, config.frozen_iterations, config.update_every, config.bootstrap_ratio,
            config.label_smoothing, config.replaced_negatives, config.likelihood_weight, config.seed,
            tuple(m.strip() for m in config.contrast_metrics.split(",")) if config.contrast_metrics else None,
            config.collapse_threshold, config.collapse_iterations)
        return DiscriminatorSource(Discriminator(judge), settings, train, spec, template, real_rows)
    return make


def run_rlhb(config: RLHBConfig, stage: rundir.StageRun) -> dict:
    return run_aligner(config, stage, rlhb_source_factory(config, stage), "RLGAF" if config.no_behavior else "RLHB",
                       config.source_warmup_rounds)


def run_oracle(config: OracleConfig, stage: rundir.StageRun) -> dict:
    def make(run_dir, data, spec, template, notes):
        prepared = rundir.read_json(rundir.require_stage(run_dir, "prepare-behaviors") / rundir.MANIFEST)
        if prepared.get("config", {}).get("from_stage") == "simulate-conversations":  # the personas' own gold
            stage.add_upstream("simulate-conversations")
            notes.append("TESTBED ONLY: trained on each conversation's hidden personas' gold, the ceiling")
            return ConversationOracleSource(rundir.require_stage(run_dir, "simulate-conversations"))
        simulated = rundir.require_stage(run_dir, "simulate-logs")
        stage.add_upstream("simulate-logs")
        notes.append("TESTBED ONLY: trained on the simulator's hidden gold reward, the ceiling for learned rewards")
        return OracleSource(simulated / "environment.json")
    return run_aligner(config, stage, make, "oracle (testbed only)")


def run_custom(config: CustomPPOConfig, stage: rundir.StageRun) -> dict:
    def make(run_dir, data, spec, template, notes):
        return load_custom(config.reward_source, run_dir=run_dir, seed=config.seed)
    return run_aligner(config, stage, make, f"custom ({config.reward_source})")
