"""The PPO engine: actor, critic, frozen reference and a pluggable reward source, on transformers + accelerate.

One iteration (the order cleanrl and trl's old PPOTrainer follow):
  1. rollout: `rollouts` sampled responses per prompt (KV cache), cut after the first EOS;
  2. score: the reward source reads the decoded text (its own tokenizer); scale, clip, missing-EOS penalty;
  3. per-token KL to the reference (k1 or k3) times the coefficient is subtracted from every token's
     reward, the score is added at the last token; GAE gives advantages and returns;
  4. `ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches;
  5. a learning reward source (the discriminator) takes its own update.
Everything random draws from seeded generators whose states go into the checkpoint, so a resumed run
continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from rlhb_cli import distributed, rundir
from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError
from rlhb_cli.rl.core import (INVALID_LOGPROB, KLController, generalized_advantages, kl_per_token,
                              leave_one_out_baseline, length_trend, masked_mean, masked_share, response_mask,
                              token_count, whiten)
from rlhb_cli.rl.rewards import GeneratedBatch
from rlhb_cli.stages.common import MetricsLog

CHECKPOINT = "checkpoint.pt"


@dataclass
class EngineConfig:
    """PPO settings every aligner shares; a stage's config adds its reward source's own."""

    init_from: str = field("train-sft", help="Starting policy: a stage of this run dir that left a policy/ "
                                             "(train-sft, train-rlhf, ...) or the path of a causal LM.")
    condition: str = field("most_preferred", help="Prompt condition: most_preferred (the best level of every "
                                                  "metric, as RLHB asks at inference), best_logged (the logged "
                                                  "behaviour with the highest mean shaped reward) or none (no "
                                                  "behaviour line).")
    condition_min_rows: int = field(50, help="best_logged: only behaviours with at least this many training rows.")
    iterations: int = field(60, help="PPO iterations (rollout, score, update) in the run.")
    prompts_per_iteration: int = field(8, help="Prompts sampled per iteration (the batch size of the paper's ablation).")
    rollouts: int = field(4, help="Responses sampled per prompt (the paper's ablation: 1, 4, 6); several let the "
                                  "advantage compare answers to the same query.")
    max_new_tokens: int = field(48, help="Tokens generated at most per response.")
    temperature: float = field(1.0, help="Sampling temperature of rollouts (log-probabilities use the same).")
    ppo_epochs: int = field(4, help="Passes of PPO updates over each iteration's rollouts.")
    minibatch_size: int = field(16, help="Responses per PPO mini-batch.")
    micro_batch_size: int = field(0, help="Responses per forward and backward pass on each process; a mini-batch's "
                                          "gradients add up over its micro-batches before its one optimizer step "
                                          "(0: the whole mini-batch in one pass). Less activation memory, the same "
                                          "update up to float rounding.")
    learning_rate: float = field(3e-5, help="Actor learning rate (AdamW). From a converged SFT policy 1e-4 moved it "
                                            "without gain, even on the gold reward (README).")
    critic: Optional[str] = field(None, help="separate (own body, a copy of the starting policy) or shared (a "
                                             "value head on the actor's body). Default: separate; shared with "
                                             "--lora-r, where the critic is a head on the one frozen base.")
    critic_learning_rate: float = field(1e-4, help="Critic learning rate.")
    lora_r: int = field(0, help="Train LoRA adapters of this rank instead of every weight (0: full weights). The "
                                "reference is the base with the adapters off, the critic a value head on it: one "
                                "copy of the policy's weights instead of three.")
    lora_alpha: float = field(32.0, help="LoRA scaling numerator (the adapter's update is scaled by alpha / r).")
    gradient_checkpointing: bool = field(False, help="Recompute the activations of actor and critic in the backward "
                                                     "pass: far less memory in the PPO update, for more time.")
    lora_target_modules: str = field("all-linear", help="LoRA: the modules given adapters (peft's target_modules; "
                                                        "comma-separated names, or all-linear).")
    gather_for_generation: bool = field(True, help="Under DeepSpeed ZeRO-3: gather the actor's sharded weights whole on "
                                                   "each device for every generation (fast). Off: each layer gathers "
                                                   "its own at every token (slow; for a policy too large for one device).")
    kl_coef: float = field(0.05, help="Coefficient of the per-token KL penalty against the reference.")
    kl_estimator: str = field("k1", help="k1 (log p - log q) or k3 (non-negative, lower variance).")
    kl_target: float = field(0.0, help="Adapt the KL coefficient towards this total KL per response (0: fixed).")
    kl_horizon: int = field(10000, help="Adaptive KL: responses over which the coefficient moves by up to 20%.")
    kl_bound: float = field(30.0, help="Warn when the mean KL per response exceeds this.")
    stop_on_kl_bound: bool = field(False, help="Stop (with a checkpoint) instead of warning when KL exceeds the bound.")
    gamma: float = field(1.0, help="Discount of GAE.")
    lam: float = field(0.95, help="Lambda of GAE.")
    cliprange: float = field(0.2, help="PPO ratio clip.")
    cliprange_value: float = field(0.2, help="Value prediction clip around the rollout's values.")
    vf_coef: float = field(0.1, help="Weight of the value loss.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm (actor and critic each).")
    whiten_rewards: bool = field(False, help="Scale per-token rewards to unit variance (mean kept) before GAE.")
    reward_scale: float = field(1.0, help="Multiply the source's reward by this before clipping.")
    reward_clip: float = field(0.0, help="Clip the scaled reward to [-c, c] (0: no clipping).")
    length_debias: bool = field(False, help="Remove from each iteration's rewards their linear trend in response "
                                            "length (least squares over the whole batch): a judge that pays for "
                                            "length, long or short, no longer steers the policy by it.")
    group_baseline: bool = field(False, help="Subtract from each response's reward the mean reward of the other "
                                             "responses to the same prompt (leave-one-out, as RLOO; needs "
                                             "--rollouts >= 2): a judge's opinion of the query itself, the same "
                                             "for every answer to it, no longer reaches the policy.")
    missing_eos_penalty: float = field(0.0, help="Subtracted from the reward of a response that hit max_new_tokens "
                                                 "without EOS.")
    collapse_threshold: float = field(0.95, help="A learning discriminator whose fake score stays above this ...")
    collapse_iterations: int = field(5, help="... for this many iterations is reported as collapsed.")
    probe_every: int = field(0, help="Every N iterations, score greedy responses to held-out validation queries "
                                     "(0: never).")
    probe_queries: int = field(32, help="Validation queries in the probe.")
    keep_best: bool = field(False, help="Leave the policy of the best probe, not the last iteration.")
    early_stop_patience: int = field(0, help="Stop after this many probes without improvement (0: never).")
    sample_every: int = field(10, help="Show and save sample completions every N iterations (0: never).")
    checkpoint_every: int = field(10, help="Iterations between checkpoints.")
    seed: int = field(0, help="Seed of prompt order, sampling and every learning reward source.")

    def __post_init__(self):
        if self.critic is None:
            self.critic = "shared" if self.lora_r else "separate"
        checks = [
            (self.iterations >= 1, "iterations must be at least 1"),
            (self.lora_r >= 0, "lora_r must be >= 0"),
            (not (self.lora_r and self.critic == "separate"), "with --lora-r the critic is a value head on the shared "
                                                              "base: use --critic shared (its default with LoRA)"),
            (self.prompts_per_iteration >= 1 and self.rollouts >= 1, "prompts_per_iteration and rollouts must be >= 1"),
            (self.minibatch_size >= 1, "minibatch_size must be at least 1"),
            (self.micro_batch_size >= 0, "micro_batch_size must be >= 0"),
            (not self.group_baseline or self.rollouts >= 2, "group_baseline needs --rollouts 2 or more"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.ppo_epochs >= 1, "ppo_epochs must be at least 1"),
            (self.kl_estimator in ("k1", "k3"), f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}"),
            (self.critic in ("separate", "shared"), f"critic must be separate or shared, got {self.critic!r}"),
            (self.condition in ("most_preferred", "best_logged", "none"),
             f"condition must be most_preferred, best_logged or none, got {self.condition!r}"),
            (self.condition_min_rows >= 1, "condition_min_rows must be >= 1"),
            (0 <= self.lam <= 1 and 0 <= self.gamma <= 1, "gamma and lam must be in [0, 1]"),
            (self.kl_coef >= 0 and self.kl_target >= 0, "kl_coef and kl_target must be >= 0"),
            (self.reward_clip >= 0, "reward_clip must be >= 0"),
            (not (self.keep_best or self.early_stop_patience) or self.probe_every > 0,
             "keep_best and early_stop_patience need --probe-every N"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if (self.prompts_per_iteration * self.rollouts) % self.minibatch_size:
            raise ValueError(f"prompts_per_iteration x rollouts = {self.prompts_per_iteration * self.rollouts} is not "
                             f"a multiple of minibatch_size {self.minibatch_size}; pick a minibatch size dividing it")


class PolicyAndValue(nn.Module):
    """Actor and critic as one module, so one optimizer and one (DDP-)wrapped forward serve both.

    `critic_body` is None for a value head sharing the actor's body.
    """

    def __init__(self, actor, critic_body=None):
        super().__init__()
        self.actor = actor
        self.critic_body = critic_body
        hidden = (critic_body or actor).config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Zero at the start: a random critic would turn the first advantages into noise and the first
        # policy steps into random ones; with V = 0 the first advantages are the (whitened) returns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        """(logits, values) at the positions that predict the last `response_length` tokens: the LM head
        runs on those only (on a short answer after a long prompt, most of its cost)."""
        shared = self.critic_body is None
        keep = response_length + 1
        out = self.actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=shared, use_cache=False, logits_to_keep=keep)
        if shared:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.critic_body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        return out.logits[:, :-1], self.value_head(hidden[:, -keep:-1]).squeeze(-1)

    def critic_parameters(self):
        body = [] if self.critic_body is None else list(self.critic_body.parameters())
        return body + list(self.value_head.parameters())


def attach_lora(actor, config: EngineConfig):
    """The actor as a peft model: LoRA adapters (trainable) over its frozen weights."""
    from peft import LoraConfig, get_peft_model
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    try:
        return get_peft_model(actor, lora)
    except ValueError as exc:
        raise RlhbError(f"--lora-target-modules {targets!r}: {str(exc).splitlines()[0]}") from None


def attach_judge_lora(model, rank: int, alpha: float):
    """A judge (sequence classifier) as a peft model: LoRA adapters on its body, its head trained in full."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                                            target_modules="all-linear"))


def reference_logits(reference, actor, input_ids, attention_mask, position_ids, keep: int = 0) -> torch.Tensor:
    """Logits of the frozen starting policy: its own copy, or (LoRA) the actor with its adapters off; at the
    last `keep` positions only (0: all)."""
    if reference is not None:
        return reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=keep).logits
    with actor.disable_adapter():
        return actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, logits_to_keep=keep).logits


def base_reference(base: Path, policy_dir: Path) -> str:
    """Where a LoRA policy's base is: relative to the run dir when inside it (so the run dir can move)."""
    run_dir = Path(policy_dir).resolve().parent.parent
    try:
        return str(Path(base).resolve().relative_to(run_dir))
    except ValueError:
        return str(Path(base).resolve())


class HFGenerator:
    """Generation behind one interface (a faster backend such as vLLM would implement `generate` alike)."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @torch.no_grad()
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        from transformers import GenerationConfig
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=not greedy, temperature=None if greedy else self.temperature,
            top_k=None if greedy else 0, top_p=None if greedy else 1.0, use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        was_training = model.training
        model.eval()
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        model.train(was_training)
        return out[:, prompt_ids.shape[1]:]

    def decode(self, raw: torch.Tensor):
        """(responses padded after EOS, mask incl. EOS, lengths, ended with EOS, texts) of generated ids."""
        pad = self.tokenizer.pad_token_id
        responses, mask, lengths, ended = response_mask(raw, self.tokenizer.eos_token_id, pad)
        texts = self.tokenizer.batch_decode(responses * mask + pad * (1 - mask), skip_special_tokens=True)
        return responses, mask, lengths, ended, [t.strip() for t in texts]


@dataclass
class Rollout:
    prompts: list[str]
    queries: list[str]
    behaviors: list[str | None]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor  # padded after EOS
    mask: torch.Tensor  # response tokens incl. EOS
    lengths: torch.Tensor
    ended: torch.Tensor
    texts: list[str]
    repeats: int = 1  # answers per prompt, consecutive (a probe's greedy rollout has 1)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - attention_mask).clamp(min=0)


class PPOEngine:
    """One PPO run: the models, the reward source, `step()` per iteration, `train()` for the whole run."""

    def __init__(self, config: EngineConfig, policy_path: Path, reward_source, stage: rundir.StageRun,
                 train_queries: list[str], probe_queries: list[str], behavior_of: Callable[[str], str | None],
                 notes: list[str]):
        from accelerate import Accelerator

        from rlhb_cli.models.load import load_causal_lm

        distributed.refuse_passes_under_deepspeed(config.micro_batch_size)
        self.config = config
        self.stage = stage
        on_cpu = not torch.cuda.is_available()
        if on_cpu and distributed.deepspeed_requested() and distributed.num_processes() > 1:
            raise RlhbError("DeepSpeed on a CPU runs here as one process only (accelerate counts each process as "
                            "alone); on CPU launch several processes with torchrun, which uses DDP")
        self.accelerator = Accelerator(cpu=on_cpu and not distributed.deepspeed_requested())
        # ZeRO-3 shards the weights themselves (with its zero3_init_flag, from the moment they are loaded)
        self.zero3 = self.zero_stage == 3
        self.source = reward_source
        self.behavior_of = behavior_of
        self.train_queries = sorted(set(train_queries))
        self.probe_queries = sorted(set(probe_queries))[:config.probe_queries]
        if len(self.train_queries) < config.prompts_per_iteration:
            raise RlhbError(f"{len(self.train_queries)} training queries, fewer than --prompts-per-iteration "
                            f"{config.prompts_per_iteration}")
        processes = self.accelerator.num_processes
        if config.prompts_per_iteration % processes or config.minibatch_size % processes:
            raise RlhbError(f"--prompts-per-iteration {config.prompts_per_iteration} and --minibatch-size "
                            f"{config.minibatch_size} must both divide among the {processes} processes")
        self.local_minibatch = config.minibatch_size // processes
        torch.manual_seed(config.seed)
        actor, self.tokenizer = load_causal_lm(policy_path, notes)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.eos_token_id is None:
            raise RlhbError(f"{policy_path}: the tokenizer has no EOS token; a response could never end")
        self.policy_path = Path(policy_path)
        if config.lora_r:  # one frozen base: the actor is it with adapters, the reference it without
            actor = attach_lora(actor, config)
            reference = None
        else:
            reference = self._starting_policy_copy(actor)  # the starting policy, frozen
            reference.requires_grad_(False)
            reference.eval()
        # A separate critic starts from the starting policy's body (a copy: same weights, fitted to the tokenizer).
        critic_body = self._starting_policy_copy(actor).base_model if config.critic == "separate" else None
        if config.gradient_checkpointing:
            for body in (actor, critic_body):
                if body is not None:
                    body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PolicyAndValue(actor, critic_body)
        # Training mode (from_pretrained leaves eval mode, in which gradient checkpointing is off) without
        # dropout: PPO's ratios compare log-probabilities that dropout would make noisy.
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        optimizer = torch.optim.AdamW([
            {"params": [p for p in actor.parameters() if p.requires_grad], "lr": config.learning_rate},
            {"params": model.critic_parameters(), "lr": config.critic_learning_rate}], eps=1e-5, weight_decay=0.0)
        if self.accelerator.state.deepspeed_plugin is not None:  # (before prepare: no under_deepspeed yet)
            deepspeed_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            # no data loader goes through prepare, so DeepSpeed learns the rows of a pass from its config
            deepspeed_config["train_micro_batch_size_per_gpu"] = self.local_minibatch
            notes.append(f"under DeepSpeed: gradients clipped by DeepSpeed at its gradient_clipping "
                         f"({deepspeed_config.get('gradient_clipping', 'none')}) over actor and critic together, "
                         f"not at --max-grad-norm each")
            if self.zero3:
                notes.append(f"under DeepSpeed ZeRO-3: actor, critic and reference sharded across "
                             f"{self.accelerator.num_processes} process(es); generation "
                             + ("gathers the actor's weights whole" if config.gather_for_generation
                                else "gathers each layer's weights at every token (--no-gather-for-generation)"))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if reference is not None and self.zero3:  # sharded as the actor is, forward passes gathering its layers
            from trl.models.utils import prepare_deepspeed
            reference = prepare_deepspeed(reference, self.accelerator)
        elif reference is not None:
            reference = reference.to(self.accelerator.device)
        self.reference = reference
        self.generator = HFGenerator(self.tokenizer, config.max_new_tokens, config.temperature)
        self.kl = KLController(config.kl_coef, config.kl_target or None, config.kl_horizon)
        self.iteration = 0
        self.collapse_run = 0
        self.collapsed_at: int | None = None
        self.best_probe = -math.inf
        self.probes_since_best = 0
        self.metrics = MetricsLog(stage.dir / "metrics.jsonl")
        self.probe_source = reward_source.frozen_copy() if hasattr(reward_source, "frozen_copy") and \
            config.probe_every else reward_source

    # ------------------------------------------------------------------------------------------- pieces
    def _starting_policy_copy(self, actor):
        """Another copy of the starting policy (reference, critic body): a deep copy of the loaded actor, or under
        ZeRO-3, whose weights may be sharded from birth and cannot be copied, a second read from disk."""
        if not self.zero3:
            return copy.deepcopy(actor)
        from rlhb_cli.models.load import load_causal_lm
        return load_causal_lm(self.policy_path, [])[0]

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def prompts_for(self, iteration: int) -> list[str]:
        """Queries of an iteration: consecutive slices of a per-epoch permutation (the data position is the
        iteration number alone, so resuming needs no sampler state). Each process takes its own share."""
        n = self.config.prompts_per_iteration
        per_epoch = len(self.train_queries) // n
        epoch, slot = divmod(iteration - 1, per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_queries))
        chosen = [self.train_queries[i] for i in order[slot * n:(slot + 1) * n]]
        return chosen[self.accelerator.process_index::self.accelerator.num_processes]

    def rollout(self, queries: list[str], repeats: int, greedy: bool = False) -> Rollout:
        from rlhb_cli.prompts import generator_prompt
        queries = [q for q in queries for _ in range(repeats)]
        behaviors = [self.behavior_of(q) for q in queries]
        prompts = [generator_prompt(q, b) for q, b in zip(queries, behaviors)]
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.accelerator.device)
        # under ZeRO-3 every layer would gather its weights at every token: gather them once for the generation
        with (distributed.gathered_weights(self.model, self.unwrapped.actor) if self.config.gather_for_generation
              else contextlib.nullcontext()):
            raw = self.generator.generate(self.unwrapped.actor, encoded["input_ids"], encoded["attention_mask"], greedy)
        responses, mask, lengths, ended, texts = self.generator.decode(raw)
        return Rollout(prompts, queries, behaviors, encoded["input_ids"], encoded["attention_mask"], responses,
                       mask, lengths, ended, texts, repeats)

    def _inputs(self, rollout: Rollout, index=slice(None)):
        ids = torch.cat([rollout.prompt_ids[index], rollout.responses[index]], dim=1)
        attention = torch.cat([rollout.prompt_mask[index], rollout.mask[index]], dim=1)
        return ids.masked_fill(attention == 0, 0), attention, _positions(attention)

    def _response_logprobs(self, logits: torch.Tensor, rollout: Rollout, index=slice(None)) -> torch.Tensor:
        """Log-probabilities of the sampled tokens from the logits at the positions that predict them."""
        from trl.trainer.utils import selective_log_softmax
        return selective_log_softmax(logits / self.config.temperature, rollout.responses[index])

    @torch.no_grad()
    def _old_policy_pass(self, rollout: Rollout, chunk: int = 32):
        """Log-probabilities of actor and reference, and values, at rollout time."""
        logprobs, ref_logprobs, values = [], [], []
        length = rollout.responses.shape[1]
        for start in range(0, len(rollout.texts), chunk):
            index = slice(start, start + chunk)
            ids, attention, positions = self._inputs(rollout, index)
            logits, value = self.model(ids, attention, positions, length)
            logprobs.append(self._response_logprobs(logits, rollout, index))
            values.append(value)
            ref_logits = reference_logits(self.reference, self.unwrapped.actor, ids, attention, positions, length + 1)
            ref_logprobs.append(self._response_logprobs(ref_logits[:, :-1], rollout, index))
        padding = rollout.mask == 0
        return (torch.cat(logprobs).masked_fill(padding, INVALID_LOGPROB),
                torch.cat(ref_logprobs).masked_fill(padding, INVALID_LOGPROB),
                torch.cat(values).masked_fill(padding, 0.0))

    def score(self, rollout: Rollout, source=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(raw reward, shaped reward the policy is paid, source logs)."""
        raw, logs = (source or self.source).score(rollout.queries, rollout.texts, rollout.behaviors)
        raw = torch.as_tensor(raw, dtype=torch.float32).reshape(-1)
        if len(raw) != len(rollout.texts):
            raise RlhbError(f"the reward source {self.source.name!r} returned {len(raw)} rewards for "
                            f"{len(rollout.texts)} responses")
        paid = raw * self.config.reward_scale
        logs = dict(logs)
        if self.config.group_baseline and rollout.repeats > 1:
            paid = paid - leave_one_out_baseline(paid, rollout.repeats)
        if self.config.length_debias:
            trend, logs["objective/length_slope"] = self._length_trend(paid, rollout.lengths)
            paid = paid - trend
        if self.config.reward_clip:
            paid = paid.clamp(-self.config.reward_clip, self.config.reward_clip)
        if self.config.missing_eos_penalty:
            paid = paid - self.config.missing_eos_penalty * (~rollout.ended).float()
        return raw, paid.to(self.accelerator.device), logs

    def _length_trend(self, reward: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's share of `length_trend` fitted on every process's batch (each removes the same trend)."""
        device = self.accelerator.device
        trend, slope = length_trend(self.accelerator.gather(reward.to(device)).cpu(),
                                    self.accelerator.gather(lengths.to(device)).cpu())
        mine = self.accelerator.process_index * len(reward)
        return trend[mine:mine + len(reward)], slope

    def _mean(self, value) -> float:
        """The mean over every process (each holds an equal share of the batch), the same on all of them."""
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).reshape(-1)
        return float(self.accelerator.gather(tensor.mean().reshape(1)).mean())

    def _std(self, value) -> float:
        gathered = self.accelerator.gather(torch.as_tensor(value, dtype=torch.float32,
                                                           device=self.accelerator.device).reshape(-1))
        return float(gathered.std()) if len(gathered) > 1 else 0.0

    def _update_source(self, rollout: Rollout, raw: torch.Tensor, iteration: int) -> dict:
        """One update of a learning reward source on the whole batch of every process, with a torch seed of
        its own: each process makes the same update, so the copies of the discriminator stay identical."""
        from accelerate.utils import gather_object
        several = self.accelerator.num_processes > 1
        batch = GeneratedBatch(
            gather_object(list(rollout.queries)) if several else rollout.queries,
            gather_object(list(rollout.texts)) if several else rollout.texts,
            gather_object(list(rollout.behaviors)) if several else rollout.behaviors,
            self.accelerator.gather(raw.to(self.accelerator.device)).cpu() if several else raw, iteration)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 100_003 + iteration)
            return self.source.update(batch)

    # ------------------------------------------------------------------------------------------- one iteration
    def step(self) -> dict:
        config = self.config
        self.iteration += 1
        row: dict = {"step": self.iteration}
        started = time.perf_counter()
        rollout = self.rollout(self.prompts_for(self.iteration), config.rollouts)
        row["time/rollout"] = time.perf_counter() - started

        started = time.perf_counter()
        raw, paid, source_logs = self.score(rollout)
        row["time/score"] = time.perf_counter() - started
        if not torch.isfinite(raw).all():
            bad = int((~torch.isfinite(raw)).sum())
            self._fail(f"the reward source {self.source.name!r} returned {bad} non-finite rewards in iteration "
                       f"{self.iteration} (rollout scoring)")

        started = time.perf_counter()
        logprobs, ref_logprobs, values = self._old_policy_pass(rollout)
        mask = rollout.mask
        kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator) * mask
        rewards = -self.kl.value * kl
        last = (rollout.lengths - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += paid
        if config.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = generalized_advantages(rewards, values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
        stats = self._ppo_update(rollout, logprobs, values, advantages, returns)
        row["time/update"] = time.perf_counter() - started

        kl_total = kl.sum(1)
        row |= {
            "objective/reward_mean": self._mean(raw), "objective/reward_std": self._std(raw),
            "objective/paid_mean": self._mean(paid), "objective/kl": self._mean(kl_total),
            "objective/kl_coef": self.kl.value, "objective/non_score_reward": self._mean(-self.kl.value * kl_total),
            "objective/return_mean": self._mean(masked_mean(returns, mask)),
            "objective/rlhf_reward": self._mean(paid - self.kl.value * kl_total),
            "gen/length": self._mean(rollout.lengths.float()), "gen/eos_rate": self._mean(rollout.ended.float()),
        } | stats | {k: self._mean(v) if isinstance(v, (int, float)) else v for k, v in source_logs.items()}
        self.kl.update(row["objective/kl"], len(rollout.texts) * self.accelerator.num_processes)

        if hasattr(self.source, "update") and getattr(self.source, "should_update", lambda i: True)(self.iteration):
            started = time.perf_counter()
            try:
                row |= self._update_source(rollout, raw, self.iteration)
            except FloatingPointError as exc:
                self._fail(f"{exc} (iteration {self.iteration}, discriminator update)")
            row["time/disc"] = time.perf_counter() - started
        self._watch_collapse(row)
        if row["objective/kl"] > config.kl_bound:
            message = (f"iteration {self.iteration}: KL to the reference {row['objective/kl']:.2f} is above the bound "
                       f"{config.kl_bound}; raise --kl-coef or lower --learning-rate")
            if config.stop_on_kl_bound:
                self._fail(message)
            row["warning"] = message
        self.last_rollout, self.last_raw = rollout, raw
        return row

    def _ppo_update(self, rollout: Rollout, old_logprobs, old_values, advantages, returns) -> dict:
        config = self.config
        n = len(rollout.texts)
        sums: dict[str, list[float]] = {k: [] for k in ("policy/approxkl", "policy/clipfrac", "policy/entropy",
                                                        "loss/policy", "loss/value", "value/clipfrac", "policy/ratio")}
        actor_params = [p for p in self.unwrapped.actor.parameters() if p.requires_grad]
        critic_params = self.unwrapped.critic_parameters()
        micro = config.micro_batch_size or self.local_minibatch
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(n)
            for start in range(0, n, self.local_minibatch):
                index = order[start:start + self.local_minibatch]
                tokens = token_count(rollout.mask[index])
                parts = [index[i:i + micro] for i in range(0, len(index), micro)]
                figures: dict[str, float] = {}
                for number, part in enumerate(parts, 1):
                    # Gradients of all but the last part stay on this process; the last one's backward
                    # averages the sum over processes, as one pass over the whole mini-batch would.
                    with (self.accelerator.no_sync(self.model) if number < len(parts) else contextlib.nullcontext()):
                        loss, part_figures = self._ppo_loss(rollout, part, tokens, old_logprobs, old_values,
                                                            advantages, returns, with_entropy=epoch == 0)
                        if not torch.isfinite(loss):
                            where = f", micro-batch {number}" if len(parts) > 1 else ""
                            self._fail(f"the PPO loss became {loss.item()} in iteration {self.iteration}, PPO epoch "
                                       f"{epoch + 1}, mini-batch {start // self.local_minibatch + 1}{where} (policy "
                                       f"{part_figures['loss/policy']}, value {part_figures['loss/value']})")
                        self.accelerator.backward(loss)
                    for key, value in part_figures.items():
                        figures[key] = figures.get(key, 0.0) + value
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(actor_params, config.max_grad_norm)
                    self.accelerator.clip_grad_norm_(critic_params, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in figures.items():
                    sums[key].append(value)
        return {k: self._mean(v) for k, v in sums.items()}

    def _ppo_loss(self, rollout: Rollout, index, tokens, old_logprobs, old_values, advantages, returns,
                  with_entropy: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped PPO loss of some responses as their share of a mini-batch of `tokens` tokens, and their
        shares of the mini-batch's figures (the entropy only on request: the first epoch's is the rollout
        policy's, later ones would repeat it at a cost)."""
        from trl.trainer.utils import entropy_from_logits
        config = self.config
        ids, attention, positions = self._inputs(rollout, index)
        logits, value = self.model(ids, attention, positions, rollout.responses.shape[1])
        m = rollout.mask[index]
        new_logprobs = self._response_logprobs(logits, rollout, index).masked_fill(m == 0, INVALID_LOGPROB)
        clipped_value = old_values[index] + (value - old_values[index]).clamp(-config.cliprange_value,
                                                                              config.cliprange_value)
        value_losses = torch.max((value - returns[index]) ** 2, (clipped_value - returns[index]) ** 2)
        value_loss = 0.5 * masked_share(value_losses, m, tokens)
        log_ratio = new_logprobs - old_logprobs[index]
        ratio = torch.exp(log_ratio)
        adv = advantages[index]
        policy_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.cliprange, 1 + config.cliprange))
        policy_loss = masked_share(policy_losses, m, tokens)
        with torch.no_grad():
            figures = {
                "policy/approxkl": float(0.5 * masked_share(log_ratio ** 2, m, tokens)),
                "policy/clipfrac": float(masked_share(((ratio - 1).abs() > config.cliprange).float(), m, tokens)),
                "loss/policy": policy_loss.item(), "loss/value": value_loss.item(),
                "value/clipfrac": float(masked_share(
                    ((value - returns[index]) ** 2 < (clipped_value - returns[index]) ** 2).float(), m, tokens)),
                "policy/ratio": float(masked_share(ratio, m, tokens)),
            }
            if with_entropy:
                figures["policy/entropy"] = float(masked_share(entropy_from_logits(logits), m, tokens))
        return policy_loss + config.vf_coef * value_loss, figures

    def _watch_collapse(self, row: dict) -> None:
        """The paper's failure mode: generated text judged real (score near 1) iteration after iteration."""
        score = row.get("disc/score_fake", row.get("disc/score_generated"))  # a frozen one has no update logs
        if score is None or not math.isfinite(score):
            return
        self.collapse_run = self.collapse_run + 1 if score > self.config.collapse_threshold else 0
        if self.collapse_run >= self.config.collapse_iterations and self.collapsed_at is None:
            self.collapsed_at = self.iteration
            row["warning"] = (f"discriminator collapsed: fake score above {self.config.collapse_threshold} for "
                              f"{self.collapse_run} iterations (since iteration {self.iteration - self.collapse_run + 1})")
        row["disc/collapsed"] = float(self.collapsed_at is not None)

    # ------------------------------------------------------------------------------------------- probe
    def probe(self) -> dict:
        """Greedy responses to held-out queries, scored by a yardstick that does not move (a learning
        discriminator's copy as it was at the start)."""
        if not self.probe_queries:
            return {}
        rollout = self.rollout(self.probe_queries, 1, greedy=True)
        raw, _, _ = self.score(rollout, self.probe_source)
        return {"probe/reward_mean": self._mean(raw), "probe/length": self._mean(rollout.lengths.float())}

    # ------------------------------------------------------------------------------------------- checkpoints
    def trained_weights(self) -> dict | None:
        """Every weight of actor and critic, or under LoRA only the adapters and the value head: the frozen
        base is the starting policy's, on disk already. Under ZeRO-3 every process must call this: the shards
        are gathered layer by layer into the main process's memory (None on the others)."""
        lora = bool(self.config.lora_r)
        if self.zero3:
            return distributed.whole_state_dict(self.model, trainable_only=lora)
        state = self.unwrapped.state_dict()
        if not lora:
            return state
        trained = {name for name, p in self.unwrapped.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trained}

    @property
    def under_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (None without DeepSpeed): a checkpoint's optimizer state is laid out by it."""
        return int(self.accelerator.state.deepspeed_plugin.zero_stage) if self.under_deepspeed else None

    def state(self, model_state: dict | None, rng_states: list | None = None,
              optimizer_states: list | None = None) -> dict:
        return {
            "model": model_state,
            "optimizer": optimizer_states if optimizer_states is not None else self.optimizer.state_dict(),
            "kl": self.kl.state_dict(), "iteration": self.iteration, "zero_stage": self.zero_stage,
            "rng": rng_states or [torch.get_rng_state()],  # one per process
            "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
            "collapse": (self.collapse_run, self.collapsed_at), "probe": (self.best_probe, self.probes_since_best),
        }

    def save_checkpoint(self, path: Path | None = None, all_processes: bool = True) -> None:
        """Written by the main process; `all_processes` (every process calls it) also keeps each one's RNG."""
        rng_states = None
        # ZeRO shards the optimizer's state: each process holds its part, and a resume needs every part
        optimizer_states = [self.optimizer.state_dict()] if self.under_deepspeed else None
        several = self.accelerator.num_processes > 1
        # ZeRO-3's weights are gathered by every process together: a failure that reached one process only
        # keeps its optimizer part (its share of the fp32 weights) but no gathered weights
        model_state = None if self.zero3 and several and not all_processes else self.trained_weights()
        if all_processes and several:
            from accelerate.utils import gather_object
            rng_states = gather_object([torch.get_rng_state()])
            if optimizer_states is not None:
                optimizer_states = gather_object(optimizer_states)
        if not self.accelerator.is_main_process:
            return
        path = path or self.stage.dir / CHECKPOINT
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state(model_state, rng_states, optimizer_states) | {"fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, weights_only=False, map_location="cpu")
        if state.get("fingerprint") != self.fingerprint:
            raise RlhbError(f"{path}: made with another config or inputs; run without --resume to start over")
        # (checkpoints of earlier versions hold no stage: a sharded optimizer state there was ZeRO-2's)
        written = state.get("zero_stage", 2 if isinstance(state["optimizer"], list) else None)
        if written != self.zero_stage:
            def launch(stage):
                return "without DeepSpeed" if stage is None else f"under DeepSpeed ZeRO-{stage}"
            raise RlhbError(f"{path}: written {launch(written)}, so its optimizer state does not fit a run "
                            f"{launch(self.zero_stage)}; resume it {launch(written)}")
        if self.zero3:  # the weights come back from the ZeRO-3 optimizer's fp32 partitions below
            expected = self.trained_weights()
            unexpected = set(state["model"]) - set(expected) if expected is not None else set()
        else:
            _, unexpected = self.unwrapped.load_state_dict(state["model"], strict=not self.config.lora_r)
            expected = self.trained_weights()
        absent = set(expected or ()) - set(state["model"])
        if unexpected or absent:
            raise RlhbError(f"{path}: its weights do not fit this model ({len(unexpected)} unexpected, "
                            f"{len(absent)} missing); run without --resume to start over")
        if self.under_deepspeed:
            parts = state["optimizer"]
            if not isinstance(parts, list) or len(parts) != self.accelerator.num_processes:
                raise RlhbError(f"{path}: not a checkpoint of this DeepSpeed run's {self.accelerator.num_processes} "
                                f"processes (its optimizer state is sharded); resume with the same launch")
            # the ZeRO optimizer takes every process's part; its fp32 master weights come back exactly (under
            # ZeRO-3 they are the model's weights too, sharded: partitioned before, gathered again after, as
            # DeepSpeed's own checkpoint loading does)
            zero = self.optimizer.optimizer
            if self.zero3:
                zero.checkpoint_event_prologue()
            zero.load_state_dict(parts, load_from_fp32_weights=True)
            if self.zero3:
                zero.checkpoint_event_epilogue()
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.kl.load_state_dict(state["kl"])
        self.iteration = state["iteration"]
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) == self.accelerator.num_processes:
            torch.set_rng_state(rng[self.accelerator.process_index])
        else:  # resumed on another number of processes: reproducible, though not the uninterrupted run
            torch.set_rng_state(rng[0])
            torch.manual_seed(int(torch.randint(2**31, (1,))) + self.accelerator.process_index)
        if state["source"] is not None:
            self.source.load_state_dict(state["source"])
        self.collapse_run, self.collapsed_at = state["collapse"]
        self.best_probe, self.probes_since_best = state["probe"]

    def trained_states(self) -> list[dict]:
        """Every weight this process trains: policy, critic and a learning reward source's model (under ZeRO-3
        the policy's and critic's are one sharded copy, not one per process: nothing of theirs to compare)."""
        states = [] if self.zero3 else [self.unwrapped.state_dict()]
        if hasattr(self.source, "state_dict") and isinstance(self.source.state_dict(), dict):
            states.append(self.source.state_dict().get("model", {}))
        return states

    def _fail(self, message: str) -> None:
        failed = self.stage.dir / "checkpoint-failed.pt"
        self.save_checkpoint(failed, all_processes=False)  # a failure may reach one process only
        raise RlhbError(f"{message}; the state at failure is in {failed}, the last good checkpoint "
                        f"({self.stage.dir / CHECKPOINT}) resumes with --resume")

    def save_policy(self, path: Path, policy_meta: dict) -> None:
        """Every process calls it (under ZeRO-3 they gather the weights together); the main one writes."""
        actor_state = None
        if self.zero3:
            gathered = self.trained_weights()
            actor_state = gathered and {k.removeprefix("actor."): v for k, v in gathered.items() if k.startswith("actor.")}
        if not self.accelerator.is_main_process:
            return
        if self.config.lora_r:  # the adapters alone; loading a policy merges them into this base
            policy_meta = policy_meta | {"lora_base": base_reference(self.policy_path, path)}
        with rundir.atomic_dir(path) as tmp:
            self.unwrapped.actor.save_pretrained(str(tmp), state_dict=actor_state)
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / "policy.json").write_text(json.dumps(policy_meta, indent=2), encoding="utf-8")

    # ------------------------------------------------------------------------------------------- the run
    def train(self, fingerprint: str, policy_meta: dict, source_warmup_rounds: int = 0) -> dict:
        """Run (or resume) the iterations; leave policy/, metrics.jsonl, samples.jsonl; return the summary."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        config, stage = self.config, self.stage
        self.fingerprint = fingerprint
        checkpoint = stage.dir / CHECKPOINT
        samples = MetricsLog(stage.dir / "samples.jsonl")
        if stage.resume and checkpoint.exists():
            self.load_checkpoint(checkpoint)
            self.metrics.keep_until(self.iteration)
            samples.keep_until(self.iteration)
        else:
            self.metrics.keep_until(-1)
            samples.keep_until(-1)
            torch.manual_seed(config.seed + self.accelerator.process_index)  # each process samples its own way
            for round_ in range(source_warmup_rounds):  # e.g. RLGAF's discriminator meets the policy's text
                rollout = self.rollout(self.prompts_for(round_ + 1), config.rollouts)
                raw, _, _ = self.score(rollout)
                logs = self._update_source(rollout, raw, 0)
                self.metrics.write({"step": 0, "warmup_round": round_ + 1} | logs)
        console = Console(stderr=True)
        main = self.accelerator.is_main_process
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("reward {task.fields[reward]:.3f}"), TextColumn("kl {task.fields[kl]:.2f}"),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=not (console.is_terminal and main))
        warnings: list[str] = []
        stopped_early = False
        with progress:
            task = progress.add_task(stage.stage, total=config.iterations, completed=self.iteration,
                                     reward=float("nan"), kl=0.0)
            while self.iteration < config.iterations:
                row = self.step()
                if config.probe_every and self.iteration % config.probe_every == 0:
                    row |= self.probe()
                    if row.get("probe/reward_mean", -math.inf) > self.best_probe:
                        self.best_probe, self.probes_since_best = row["probe/reward_mean"], 0
                        if config.keep_best:
                            self.save_policy(stage.dir / "policy", policy_meta | {"iteration": self.iteration})
                    else:
                        self.probes_since_best += 1
                if "warning" in row:
                    warnings.append(row["warning"])
                    if main:
                        console.print(f"[yellow]warning:[/] {row['warning']}", highlight=False)
                if main:
                    self.metrics.write(row)
                progress.update(task, completed=self.iteration, reward=row["objective/reward_mean"],
                                kl=row["objective/kl"])
                if config.sample_every and self.iteration % config.sample_every == 0 and main:
                    self._show_samples(console, samples)
                done = self.iteration >= config.iterations
                if config.early_stop_patience and self.probes_since_best >= config.early_stop_patience:
                    stopped_early = done = True
                if done or self.iteration % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if done:
                    break
                if stage.stop_after_steps and self.iteration >= stage.stop_after_steps:
                    self.save_checkpoint()
                    raise rundir.StageStopped(f"stopped after {self.iteration} of {config.iterations} iterations")
        if not (config.keep_best and (stage.dir / "policy").exists()):
            self.save_policy(stage.dir / "policy", policy_meta | {"iteration": self.iteration})
        return self._summary(warnings, stopped_early) | distributed.processes_summary(*self.trained_states())

    def _show_samples(self, console, samples: MetricsLog, count: int = 4) -> None:
        from rich.table import Table
        rollout, raw = self.last_rollout, self.last_raw
        table = Table(title=f"{self.stage.stage}: samples at iteration {self.iteration}", title_justify="left",
                      show_lines=True)
        for column in ("query", "response", "reward"):
            table.add_column(column, overflow="fold")
        for i in range(min(count, len(rollout.texts))):
            table.add_row(rollout.queries[i][:80], rollout.texts[i][:200], f"{float(raw[i]):.3f}")
            samples.write({"step": self.iteration, "query": rollout.queries[i], "behavior": rollout.behaviors[i],
                           "response": rollout.texts[i], "reward": float(raw[i])})
        console.print(table)

    def _summary(self, warnings: list[str], stopped_early: bool) -> dict:
        rows = [r for r in self.metrics.rows() if "objective/reward_mean" in r]
        rewards = [r["objective/reward_mean"] for r in rows]
        tail = rows[-max(1, len(rows) // 10):]

        def tail_mean(key: str):
            values = [r[key] for r in tail if key in r and r[key] is not None and math.isfinite(r[key])]
            return round(float(np.mean(values)), 4) if values else None

        probes = [(r["probe/reward_mean"], r["step"]) for r in rows if "probe/reward_mean" in r]
        return {
            "reward_first": round(rewards[0], 4) if rewards else None,
            "reward_final": tail_mean("objective/reward_mean"),
            "reward_best": round(max(rewards), 4) if rewards else None,
            "kl_final": tail_mean("objective/kl"),
            "entropy_final": tail_mean("policy/entropy"),
            "disc_score_real_final": tail_mean("disc/score_real"),
            "disc_score_fake_final": tail_mean("disc/score_fake"),
            "disc_collapsed": self.collapsed_at is not None,
            "disc_collapsed_at": self.collapsed_at,
            "probe_best": round(self.best_probe, 4) if probes else None,
            "probe_best_iteration": max(probes, key=lambda p: p[0])[1] if probes else None,  # the first of a tie
            "iterations": self.iteration,
            "stopped_early": stopped_early,
            "warnings": warnings[-5:],
        }
