"""The PPO loop: actor, critic, frozen reference and a pluggable reward source, on transformers + accelerate.

One iteration, `PPOEngine.step`, read top to bottom (the order cleanrl and trl's old PPOTrainer follow):
  1. rollout: `rollouts` sampled responses per prompt (KV cache), cut after the first EOS;
  2. score: the reward source reads the decoded text (its own tokenizer) and the engine turns its score
     into the paid reward (`reward_shaping.paid_reward`);
  3. the old policy's and the reference's log-probabilities; per-token KL to the reference times the
     coefficient is subtracted from every token's reward, the paid reward added at the last token
     (`reward_shaping.token_rewards`); GAE gives advantages and returns;
  4. `ppo_epochs` passes of clipped policy and value updates over shuffled mini-batches (`_ppo_loss`);
  5. a learning reward source (the discriminator) takes its own update and watches its own health.
Everything random draws from seeded generators whose states go into the checkpoint, so a resumed run
continues exactly as the uninterrupted one would. The models are built in `actor_critic`, saved and
restored in `checkpoint`, shown in `display`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rlhb_cli import distributed, rundir
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.generation import HFGenerator
from rlhb_cli.prompts import PromptFormat, policy_meta
from rlhb_cli.rl import checkpoint, display
from rlhb_cli.rl.actor_critic import PolicyAndValue, build_actor_critic, reference_logits
from rlhb_cli.rl.config import EngineConfig
from rlhb_cli.rl.core import (INVALID_LOGPROB, KLController, generalized_advantages, length_trend, masked_mean,
                              masked_share, token_count, whiten)
from rlhb_cli.rl.history import with_policy_history
from rlhb_cli.rl.reward_shaping import paid_reward, token_rewards
from rlhb_cli.rl.sources import GeneratedBatch, LearningRewardSource, RewardSource


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

    def __init__(self, config: EngineConfig, policy_path: Path, reward_source: RewardSource, stage: rundir.StageRun,
                 train_queries: list[str], probe_queries: list[str], behavior_of: Callable[[str], str | None],
                 notes: list[str]):
        distributed.refuse_passes_under_deepspeed(config.ppo.micro_batch_size)
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
        self.learning_source = reward_source if isinstance(reward_source, LearningRewardSource) else None
        self.behavior_of = behavior_of
        self.train_queries = sorted(set(train_queries))
        self.probe_queries = sorted(set(probe_queries))[:config.probe.queries]
        if len(self.train_queries) < config.prompts_per_iteration:
            raise RlhbError(f"{len(self.train_queries)} training queries, fewer than --prompts-per-iteration "
                            f"{config.prompts_per_iteration}")
        processes = self.accelerator.num_processes
        if config.prompts_per_iteration % processes or config.ppo.minibatch_size % processes:
            raise RlhbError(f"--prompts-per-iteration {config.prompts_per_iteration} and --minibatch-size "
                            f"{config.ppo.minibatch_size} must both divide among the {processes} processes")
        self.local_minibatch = config.ppo.minibatch_size // processes
        torch.manual_seed(config.seed)
        self.policy_path = Path(policy_path)
        self.model, self.optimizer, self.reference, self.tokenizer = build_actor_critic(
            config, self.policy_path, self.accelerator, self.zero3, self.local_minibatch, notes)
        self.generator = HFGenerator(self.tokenizer, config.max_new_tokens, config.temperature,
                                     config.packed_generation)
        self.prompt_format = PromptFormat.of_policy(policy_meta(self.policy_path), self.tokenizer, self.policy_path)
        self.kl = KLController(config.kl.coef, config.kl.target or None, config.kl.horizon)
        self.iteration = 0
        self.best_probe = -math.inf
        self.probes_since_best = 0
        self.fingerprint = ""
        self.metrics = rundir.MetricsLog(stage.dir / "metrics.jsonl", stage.trackers)
        self.probe_source = self.learning_source.frozen_copy() if self.learning_source and config.probe.every \
            else reward_source

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    @property
    def under_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (None without DeepSpeed): a checkpoint's optimizer state is laid out by it."""
        return int(self.accelerator.state.deepspeed_plugin.zero_stage) if self.under_deepspeed else None

    # ------------------------------------------------------------------------------------------- the run
    def train(self, fingerprint: str, policy_meta: dict, source_warmup_rounds: int = 0) -> dict:
        """Run (or resume) the iterations; leave policy/, metrics.jsonl, samples.jsonl; return the summary."""
        config, stage = self.config, self.stage
        self.fingerprint = fingerprint
        samples = rundir.MetricsLog(stage.dir / "samples.jsonl")
        if stage.resume and (stage.dir / checkpoint.CHECKPOINT).exists():
            checkpoint.load_checkpoint(self, stage.dir / checkpoint.CHECKPOINT)
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
        main = self.accelerator.is_main_process
        console, progress = display.console_and_progress(main)
        warnings: list[str] = []
        stopped_early = False
        with progress:
            task = progress.add_task(stage.stage, total=config.iterations, completed=self.iteration,
                                     reward=float("nan"), kl=0.0)
            while self.iteration < config.iterations:
                row = self.step()
                if config.probe.every and self.iteration % config.probe.every == 0:
                    row |= self.probe()
                    if row.get("probe/reward_mean", -math.inf) > self.best_probe:
                        self.best_probe, self.probes_since_best = row["probe/reward_mean"], 0
                        if config.probe.keep_best:
                            checkpoint.save_policy(self, stage.dir / "policy", policy_meta | {"iteration": self.iteration})
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
                    display.show_samples(console, samples, stage.stage, self.iteration, self.last_rollout,
                                         self.last_raw)
                done = self.iteration >= config.iterations
                if config.probe.early_stop_patience and self.probes_since_best >= config.probe.early_stop_patience:
                    stopped_early = done = True
                if done or self.iteration % config.checkpoint_every == 0:
                    checkpoint.save_checkpoint(self)
                if done:
                    break
                if stage.stop_after_steps and self.iteration >= stage.stop_after_steps:
                    checkpoint.save_checkpoint(self)
                    raise rundir.StageStopped(f"stopped after {self.iteration} of {config.iterations} iterations")
        if not (config.probe.keep_best and (stage.dir / "policy").exists()):
            checkpoint.save_policy(self, stage.dir / "policy", policy_meta | {"iteration": self.iteration})
        return self._summary(warnings, stopped_early) | distributed.processes_summary(*checkpoint.trained_states(self))

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
        row["time/old_pass"] = time.perf_counter() - started  # part of time/update
        mask = rollout.mask
        rewards, kl = token_rewards(paid, logprobs, ref_logprobs, mask, rollout.lengths, self.kl.value, config)
        advantages, returns = generalized_advantages(rewards, values, mask, config.ppo.gamma, config.ppo.lam)
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

        source = self.learning_source
        if source is not None and source.should_update(self.iteration):
            started = time.perf_counter()
            try:
                row |= self._update_source(rollout, raw, self.iteration)
            except FloatingPointError as exc:
                self._fail(f"{exc} (iteration {self.iteration}, reward source update)")
            row["time/disc"] = time.perf_counter() - started
        if source is not None:
            warning = source.watch(row, self.iteration)
            if warning:
                row["warning"] = warning
        if row["objective/kl"] > config.kl.bound:
            message = (f"iteration {self.iteration}: KL to the reference {row['objective/kl']:.2f} is above the bound "
                       f"{config.kl.bound}; raise --kl-coef or lower --learning-rate")
            if config.kl.stop_on_bound:
                self._fail(message)
            row["warning"] = message
        self.last_rollout, self.last_raw = rollout, raw
        return row

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
        """`repeats` replies to each query; with `--history policy` to its conversation with the policy's own
        earlier replies (one history per query, shared by its repeats), which the reward source then reads."""
        if self.config.history == "policy":
            def reply(talks: list[list[dict]], asked: list[str | None]) -> list[str]:
                _, (*_, texts) = self._sample([self.prompt_format.conversation_prompt(t, b)
                                               for t, b in zip(talks, asked)], greedy)
                return texts
            queries = with_policy_history(queries, [self.behavior_of(q) for q in queries], reply)
        queries = [q for q in queries for _ in range(repeats)]
        behaviors = [self.behavior_of(q) for q in queries]
        prompts = [self.prompt_format.prompt(q, b) for q, b in zip(queries, behaviors)]
        encoded, (responses, mask, lengths, ended, texts) = self._sample(prompts, greedy)
        return Rollout(prompts, queries, behaviors, encoded["input_ids"], encoded["attention_mask"], responses,
                       mask, lengths, ended, texts, repeats)

    def _sample(self, prompts: list[str], greedy: bool):
        """The encoded prompts and the decoded replies (ids, mask, lengths, ended, texts)."""
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.accelerator.device)
        # under ZeRO-3 every layer would gather its weights at every token: gather them once for the generation
        with (distributed.gathered_weights(self.model, self.unwrapped.actor) if self.config.gather_for_generation
              else contextlib.nullcontext()):
            raw = self.generator.generate(self.unwrapped.actor, encoded["input_ids"], encoded["attention_mask"], greedy)
        return encoded, self.generator.decode(raw)

    def score(self, rollout: Rollout, source: RewardSource | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(raw score of the source, paid reward, logs)."""
        raw, logs = (source or self.source).score(rollout.queries, rollout.texts, rollout.behaviors)
        raw = torch.as_tensor(raw, dtype=torch.float32).reshape(-1)
        if len(raw) != len(rollout.texts):
            raise RlhbError(f"the reward source {self.source.name!r} returned {len(raw)} rewards for "
                            f"{len(rollout.texts)} responses")
        paid, shaping_logs = paid_reward(raw, rollout.lengths, rollout.ended, rollout.repeats, self.config,
                                         self._length_trend)
        return raw, paid.to(self.accelerator.device), dict(logs) | shaping_logs

    def _inputs(self, rollout: Rollout, index=slice(None)):
        ids = torch.cat([rollout.prompt_ids[index], rollout.responses[index]], dim=1)
        attention = torch.cat([rollout.prompt_mask[index], rollout.mask[index]], dim=1)
        return ids.masked_fill(attention == 0, 0), attention, _positions(attention)

    def _response_logprobs(self, logits: torch.Tensor, rollout: Rollout, index=slice(None)) -> torch.Tensor:
        """Log-probabilities of the sampled tokens from the logits at the positions that predict them."""
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

    def _ppo_update(self, rollout: Rollout, old_logprobs, old_values, advantages, returns) -> dict:
        config = self.config
        n = len(rollout.texts)
        sums: dict[str, list[float]] = {k: [] for k in ("policy/approxkl", "policy/clipfrac", "policy/entropy",
                                                        "loss/policy", "loss/value", "value/clipfrac", "policy/ratio")}
        actor_params = [p for p in self.unwrapped.actor.parameters() if p.requires_grad]
        critic_params = self.unwrapped.critic_parameters()
        micro = config.ppo.micro_batch_size or self.local_minibatch
        for epoch in range(config.ppo.epochs):
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
                    self.accelerator.clip_grad_norm_(actor_params, config.ppo.max_grad_norm)
                    self.accelerator.clip_grad_norm_(critic_params, config.ppo.max_grad_norm)
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
        config = self.config
        ids, attention, positions = self._inputs(rollout, index)
        logits, value = self.model(ids, attention, positions, rollout.responses.shape[1])
        m = rollout.mask[index]
        new_logprobs = self._response_logprobs(logits, rollout, index).masked_fill(m == 0, INVALID_LOGPROB)
        clipped_value = old_values[index] + (value - old_values[index]).clamp(-config.ppo.cliprange_value,
                                                                              config.ppo.cliprange_value)
        value_losses = torch.max((value - returns[index]) ** 2, (clipped_value - returns[index]) ** 2)
        value_loss = 0.5 * masked_share(value_losses, m, tokens)
        log_ratio = new_logprobs - old_logprobs[index]
        ratio = torch.exp(log_ratio)
        adv = advantages[index]
        policy_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - config.ppo.cliprange, 1 + config.ppo.cliprange))
        policy_loss = masked_share(policy_losses, m, tokens)
        with torch.no_grad():
            figures = {
                "policy/approxkl": float(0.5 * masked_share(log_ratio ** 2, m, tokens)),
                "policy/clipfrac": float(masked_share(((ratio - 1).abs() > config.ppo.cliprange).float(), m, tokens)),
                "loss/policy": policy_loss.item(), "loss/value": value_loss.item(),
                "value/clipfrac": float(masked_share(
                    ((value - returns[index]) ** 2 < (clipped_value - returns[index]) ** 2).float(), m, tokens)),
                "policy/ratio": float(masked_share(ratio, m, tokens)),
            }
            if with_entropy:
                figures["policy/entropy"] = float(masked_share(entropy_from_logits(logits), m, tokens))
        return policy_loss + config.ppo.vf_coef * value_loss, figures

    def _update_source(self, rollout: Rollout, raw: torch.Tensor, iteration: int) -> dict:
        """One update of a learning reward source on the whole batch of every process, with a torch seed of
        its own: each process makes the same update, so the copies of the discriminator stay identical."""
        several = self.accelerator.num_processes > 1
        batch = GeneratedBatch(
            gather_object(list(rollout.queries)) if several else rollout.queries,
            gather_object(list(rollout.texts)) if several else rollout.texts,
            gather_object(list(rollout.behaviors)) if several else rollout.behaviors,
            self.accelerator.gather(raw.to(self.accelerator.device)).cpu() if several else raw, iteration)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 100_003 + iteration)
            return self.learning_source.update(batch)

    # ------------------------------------------------------------------------------------------- across processes
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

    # ------------------------------------------------------------------------------------------- probe, failure
    def probe(self) -> dict:
        """Greedy responses to held-out queries, scored by a yardstick that does not move (a learning
        discriminator's copy as it was at the start)."""
        if not self.probe_queries:
            return {}
        rollout = self.rollout(self.probe_queries, 1, greedy=True)
        raw, _, _ = self.score(rollout, self.probe_source)
        return {"probe/reward_mean": self._mean(raw), "probe/length": self._mean(rollout.lengths.float())}

    def _fail(self, message: str) -> None:
        failed = self.stage.dir / "checkpoint-failed.pt"
        checkpoint.save_checkpoint(self, failed, all_processes=False)  # a failure may reach one process only
        raise RlhbError(f"{message}; the state at failure is in {failed}, the last good checkpoint "
                        f"({self.stage.dir / checkpoint.CHECKPOINT}) resumes with --resume")

    def _summary(self, warnings: list[str], stopped_early: bool) -> dict:
        rows = [r for r in self.metrics.rows() if "objective/reward_mean" in r]
        rewards = [r["objective/reward_mean"] for r in rows]
        probes = [(r["probe/reward_mean"], r["step"]) for r in rows if "probe/reward_mean" in r]
        return {
            "reward_first": round(rewards[0], 4) if rewards else None,
            "reward_final": rundir.tail_mean(rows, "objective/reward_mean"),
            "reward_best": round(max(rewards), 4) if rewards else None,
            "kl_final": rundir.tail_mean(rows, "objective/kl"),
            "entropy_final": rundir.tail_mean(rows, "policy/entropy"),
        } | (self.learning_source.summary(rows) if self.learning_source else {}) | {
            "probe_best": round(self.best_probe, 4) if probes else None,
            "probe_best_iteration": max(probes, key=lambda p: p[0])[1] if probes else None,  # the first of a tie
            "iterations": self.iteration,
            "stopped_early": stopped_early,
            "warnings": warnings[-5:],
        }
