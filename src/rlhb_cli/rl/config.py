"""The PPO engine's config: what every aligner shares, in groups (ppo, kl, shaping, lora, probe) read in code
as `config.kl.coef`; outside, each setting keeps its flat flag and YAML key (`--kl-coef`, `kl_coef`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhb_cli.config import field, group
from rlhb_cli.models.lora import LoRASettings
from rlhb_cli.rl.history import HISTORY


@dataclass
class PPOSettings:
    """The PPO update: passes and batches, learning rates, clipping, GAE, the critic."""

    epochs: int = field(4, flat="ppo_epochs", help="Passes of PPO updates over each iteration's rollouts.")
    minibatch_size: int = field(16, help="Responses per PPO mini-batch.")
    micro_batch_size: int = field(0, help="Responses per forward and backward pass on each process; a mini-batch's "
                                          "gradients add up over its micro-batches before its one optimizer step "
                                          "(0: the whole mini-batch in one pass). Less activation memory, the same "
                                          "update up to float rounding.")
    learning_rate: float = field(3e-5, help="Actor learning rate (AdamW). From a converged SFT policy 1e-4 moved it "
                                            "without gain, even on the gold reward (docs/results.md).")
    critic: Optional[str] = field(None, help="separate (own body, a copy of the starting policy) or shared (a "
                                             "value head on the actor's body). Default: separate; shared with "
                                             "--lora-r, where the critic is a head on the one frozen base.")
    critic_learning_rate: float = field(1e-4, help="Critic learning rate.")
    gamma: float = field(1.0, help="Discount of GAE.")
    lam: float = field(0.95, help="Lambda of GAE.")
    cliprange: float = field(0.2, help="PPO ratio clip.")
    cliprange_value: float = field(0.2, help="Value prediction clip around the rollout's values.")
    vf_coef: float = field(0.1, help="Weight of the value loss.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm (actor and critic each).")


@dataclass
class KLSettings:
    """The KL penalty against the reference: its coefficient, estimator, adaptive target and bound."""

    coef: float = field(0.05, flat="kl_coef", help="Coefficient of the per-token KL penalty against the reference.")
    estimator: str = field("k1", flat="kl_estimator", help="k1 (log p - log q) or k3 (non-negative, lower variance).")
    target: float = field(0.0, flat="kl_target",
                          help="Adapt the KL coefficient towards this total KL per response (0: fixed).")
    horizon: int = field(10000, flat="kl_horizon",
                         help="Adaptive KL: responses over which the coefficient moves by up to 20%.")
    bound: float = field(30.0, flat="kl_bound", help="Warn when the mean KL per response exceeds this.")
    stop_on_bound: bool = field(False, flat="stop_on_kl_bound",
                                help="Stop (with a checkpoint) instead of warning when KL exceeds the bound.")


@dataclass
class RewardShaping:
    """What the engine does to a source's reward before PPO sees it (reward_shaping.paid_reward)."""

    scale: Optional[float] = field(1.0, flat="reward_scale", help="Multiply the source's reward by this before clipping.")
    clip: float = field(0.0, flat="reward_clip", help="Clip the scaled reward to [-c, c] (0: no clipping).")
    whiten: bool = field(False, flat="whiten_rewards",
                         help="Scale per-token rewards to unit variance (mean kept) before GAE.")
    length_debias: Optional[bool] = field(False, help="Remove from each iteration's rewards their linear trend in "
                                                      "response length (least squares over the whole batch): a judge "
                                                      "that pays for length, long or short, no longer steers the "
                                                      "policy by it.")
    group_baseline: bool = field(False, help="Subtract from each response's reward the mean reward of the other "
                                             "responses to the same prompt (leave-one-out, as RLOO; needs "
                                             "--rollouts >= 2): a judge's opinion of the query itself, the same "
                                             "for every answer to it, no longer reaches the policy.")
    missing_eos_penalty: float = field(0.0, help="Subtracted from the reward of a response that hit max_new_tokens "
                                                 "without EOS.")


@dataclass
class ProbeSettings:
    """Greedy answers to held-out validation queries, scored every few iterations: keep the best, stop early."""

    every: int = field(0, flat="probe_every",
                       help="Every N iterations, score greedy responses to held-out validation queries (0: never).")
    queries: int = field(32, flat="probe_queries", help="Validation queries in the probe.")
    keep_best: bool = field(False, help="Leave the policy of the best probe, not the last iteration.")
    early_stop_patience: int = field(0, help="Stop after this many probes without improvement (0: never).")


@dataclass
class EngineConfig:
    """PPO settings every aligner shares; a stage's config adds its reward source's own. The CLI makes one
    flag of each setting, groups opened (rlhb_cli.config.flat_fields)."""

    init_from: str = field("train-sft", help="Starting policy: a stage of this run dir that left a policy/ "
                                             "(train-sft, train-rlhf, ...), a model folder, a GGUF file or "
                                             "smollm2 (a pretrained model as it comes).")
    condition: str = field("most_preferred", help="Prompt condition: most_preferred (the best level of every "
                                                  "metric, as RLHB asks at inference), best_logged (the logged "
                                                  "behaviour with the highest mean shaped reward) or none (no "
                                                  "behaviour line).")
    condition_min_rows: int = field(50, help="best_logged: only behaviours with at least this many training rows.")
    history: str = field("logs", help="A conversation's earlier replies in each rollout: logs (as the platform showed "
                                      "them) or policy (regenerated by the current policy turn by turn; the users' "
                                      "turns stay as logged). A one-turn query has none.")
    iterations: int = field(60, help="PPO iterations (rollout, score, update) in the run.")
    prompts_per_iteration: int = field(8, help="Prompts sampled per iteration (the batch size of the paper's ablation).")
    rollouts: int = field(4, help="Responses sampled per prompt (the paper's ablation: 1, 4, 6); several let the "
                                  "advantage compare answers to the same query.")
    max_new_tokens: int = field(48, help="Tokens generated at most per response.")
    temperature: float = field(1.0, help="Sampling temperature of rollouts (log-probabilities use the same).")
    ppo: PPOSettings = group(PPOSettings, help="The PPO update.")
    kl: KLSettings = group(KLSettings, help="The KL penalty.")
    shaping: RewardShaping = group(RewardShaping, help="Reward shaping.")
    lora: LoRASettings = group(LoRASettings, help="LoRA adapters.", help_overrides={
        "lora_r": "Train LoRA adapters of this rank instead of every weight (0: full weights). The reference is the "
                  "base with the adapters off, the critic a value head on it: one copy of the policy's weights "
                  "instead of three."})
    gradient_checkpointing: bool = field(False, help="Recompute the activations of actor and critic in the backward "
                                                     "pass: far less memory in the PPO update, for more time.")
    gather_for_generation: bool = field(True, help="Under DeepSpeed ZeRO-3: gather the actor's sharded weights whole on "
                                                   "each device for every generation (fast). Off: each layer gathers "
                                                   "its own at every token (slow; for a policy too large for one device).")
    packed_generation: bool = field(False, help="On a CPU: generate through oneDNN's matrix products on weights "
                                               "packed once a rollout (decoding SmolLM2 1.5x faster here); the same "
                                               "up to float rounding, so a sampled token can differ from a plain run's.")
    probe: ProbeSettings = group(ProbeSettings, help="The validation probe.")
    sample_every: int = field(10, help="Show and save sample completions every N iterations (0: never).")
    checkpoint_every: int = field(10, help="Iterations between checkpoints.")
    seed: int = field(0, help="Seed of prompt order, sampling and every learning reward source.")

    def __post_init__(self):
        ppo, kl, shaping = self.ppo, self.kl, self.shaping
        if ppo.critic is None:
            ppo.critic = "shared" if self.lora.r else "separate"
        checks = [
            (self.iterations >= 1, "iterations must be at least 1"),
            (not (self.lora.r and ppo.critic == "separate"), "with --lora-r the critic is a value head on the shared "
                                                             "base: use --critic shared (its default with LoRA)"),
            (self.prompts_per_iteration >= 1 and self.rollouts >= 1, "prompts_per_iteration and rollouts must be >= 1"),
            (ppo.minibatch_size >= 1, "minibatch_size must be at least 1"),
            (ppo.micro_batch_size >= 0, "micro_batch_size must be >= 0"),
            (not shaping.group_baseline or self.rollouts >= 2, "group_baseline needs --rollouts 2 or more"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (ppo.epochs >= 1, "ppo_epochs must be at least 1"),
            (kl.estimator in ("k1", "k3"), f"kl_estimator must be k1 or k3, got {kl.estimator!r}"),
            (ppo.critic in ("separate", "shared"), f"critic must be separate or shared, got {ppo.critic!r}"),
            (self.condition in ("most_preferred", "best_logged", "none"),
             f"condition must be most_preferred, best_logged or none, got {self.condition!r}"),
            (self.history in HISTORY, f"history must be logs or policy, got {self.history!r}"),
            (self.condition_min_rows >= 1, "condition_min_rows must be >= 1"),
            (0 <= ppo.lam <= 1 and 0 <= ppo.gamma <= 1, "gamma and lam must be in [0, 1]"),
            (kl.coef >= 0 and kl.target >= 0, "kl_coef and kl_target must be >= 0"),
            (shaping.clip >= 0, "reward_clip must be >= 0"),
            (shaping.scale is not None and shaping.length_debias is not None,
             "reward_scale and length_debias need a value"),
            (not (self.probe.keep_best or self.probe.early_stop_patience) or self.probe.every > 0,
             "keep_best and early_stop_patience need --probe-every N"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if (self.prompts_per_iteration * self.rollouts) % ppo.minibatch_size:
            raise ValueError(f"prompts_per_iteration x rollouts = {self.prompts_per_iteration * self.rollouts} is not "
                             f"a multiple of minibatch_size {ppo.minibatch_size}; pick a minibatch size dividing it")
