"""The training loop of the judges (discriminator, behaviour classifier): plain PyTorch, resumable.

Texts are tokenized once. The batch order of epoch e is a permutation seeded by (seed, e), so a run
resumed from a checkpoint (model, optimizer, schedule, RNG state, step) sees exactly the batches the
uninterrupted run would have, and ends with the same numbers.

A judge on a frozen body learns its head alone from the body's features of each distinct text,
computed once before the first step (split among the processes of a launcher, then shared).

Under a launcher each process takes its share of every batch and DDP averages the gradients, weighted
so that a step equals the one-process step on the whole batch; every process evaluates the whole
validation set (the weights are the same), and only the main one writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rlhb_cli import distributed
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.judge import Judge, learning_weights, load_learning_weights, padded_batch
from rlhb_cli.rundir import MetricsLog, StageRun, StageStopped, load_checkpoint_file
from rlhb_cli.stages.common import progress_bar

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_fraction: float
    max_grad_norm: float
    seed: int
    checkpoint_every: int
    log_every: int = 10
    micro_batch_size: int = 0  # rows per forward and backward pass on each process (0: its whole share)


def _save_checkpoint(path, judge, optimizer, scheduler, step, fingerprint, window=(0.0, 0)) -> None:
    """Written by the main process; keeps every process's RNG (each has its own dropout)."""
    rng = [torch.get_rng_state()]
    if distributed.num_processes() > 1:
        # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
        from accelerate.utils import gather_object
        rng = gather_object(rng)
    if not distributed.is_main_process():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": learning_weights(judge.model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "step": step,
                "fingerprint": fingerprint, "loss_window": window}, tmp)
    os.replace(tmp, path)


def _restore_rng(saved) -> None:
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == distributed.num_processes():
        torch.set_rng_state(states[distributed.process_index()])
    else:  # resumed on another number of processes: reproducible, though not the uninterrupted run
        torch.set_rng_state(states[0])
        torch.manual_seed(int(torch.randint(2**31, (1,))) + distributed.process_index())


def _share(index: np.ndarray) -> tuple[np.ndarray, float]:
    """This process's rows of a batch and the weight of its mean loss, so that DDP's average of the
    processes' gradients is the gradient of the whole batch's mean loss. A process left without a row
    (a last batch smaller than the number of processes) takes one with weight 0."""
    rank, processes = distributed.process_index(), distributed.num_processes()
    mine = index[rank::processes]
    if len(mine) == 0:
        return index[:1], 0.0
    return mine, len(mine) * processes / len(index)


def _cache_body_features(judge: Judge, texts: list[str], progress) -> None:
    """Fill the frozen-body judge's feature cache with every distinct text, each process reading its share."""
    judge.cache_features(True)
    unique = list(dict.fromkeys(texts))
    mine = unique[distributed.process_index()::distributed.num_processes()]
    task = progress.add_task("body features", total=len(mine), loss=float("nan"), rate=0.0)
    for start in range(0, len(mine), 256):
        judge.features(mine[start:start + 256])
        progress.update(task, completed=min(start + 256, len(mine)))
    progress.remove_task(task)
    if distributed.num_processes() > 1:
        # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
        from accelerate.utils import gather_object
        shares = gather_object([{t: judge.feature_cache[t] for t in mine}])
        for share in shares:
            judge.feature_cache.update(share)


def train_judge(judge: Judge, texts: list[str], targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], settings: LoopSettings,
                stage: StageRun, evaluate: Callable[[], dict], fingerprint: str) -> dict:
    """Train `judge` on (texts, targets); evaluate after every epoch; returns the last evaluation."""
    frozen = judge.frozen_body
    encoded = None if frozen else judge.tokenizer(texts, truncation=True, max_length=judge.meta.max_length)["input_ids"]
    n = len(texts)
    if distributed.deepspeed_requested():
        # accelerate hands this loop's model to DeepSpeed only through prepare(model, optimizer), whose engine
        # then owns backward, clipping and step: this loop would train each process alone, unsynced
        raise RlhbError(f"{stage.stage} does not run under DeepSpeed (its loop is plain DDP); launch it with "
                        f"torchrun or an accelerate config without DeepSpeed (experiments/accelerate/multi-gpu-ddp.yaml)")
    per_pass, passes = distributed.accumulation(settings.batch_size, settings.micro_batch_size)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = judge.model
    learning = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in learning if p.ndim >= 2]
    no_decay = [p for p in learning if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    # OneCycleLR divides by zero when the warm-up is exactly one step; one step of warm-up is none at all
    warmup = settings.warmup_fraction if abs(settings.warmup_fraction * total - 1) > 1e-9 else 0.5 / total
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate, total_steps=total,
                                                    pct_start=warmup, anneal_strategy="cos")
    metrics = MetricsLog(stage.dir / "metrics.jsonl", stage.trackers)
    checkpoint = stage.dir / CHECKPOINT
    start = 0
    if stage.resume and checkpoint.exists():
        state = load_checkpoint_file(checkpoint)
        if state["fingerprint"] != fingerprint:
            raise RlhbError(f"{checkpoint}: made with another config or data; run without --resume to start over")
        load_learning_weights(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"])
        start = state["step"]
        resumed_window = state.get("loss_window", (0.0, 0))
        metrics.keep_until(start)
    else:
        resumed_window = (0.0, 0)
        metrics.keep_until(-1)
        torch.manual_seed(settings.seed + distributed.process_index())
    # DDP under a launcher (the same module otherwise); a frozen body's judge trains its head alone
    trained = accelerator.prepare_model(judge.head if frozen else model)
    model.train()
    pad_id = judge.tokenizer.pad_token_id
    evaluation: dict = {}
    (window_loss, window_count), started = resumed_window, time.perf_counter()
    with progress_bar() as progress:
        if frozen:
            _cache_body_features(judge, texts, progress)
            features = judge.features(texts)
        task = progress.add_task(stage.stage, total=total, completed=start, loss=float("nan"), rate=0.0)
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            order = np.random.default_rng([settings.seed, epoch]).permutation(n)
            index = order[k * settings.batch_size:(k + 1) * settings.batch_size]
            mine, weight = _share(index)
            micro = per_pass if passes > 1 else len(mine)
            parts = [mine[i:i + micro] for i in range(0, len(mine), micro)]
            local = torch.zeros(())
            for number, part in enumerate(parts, 1):
                # a part's mean loss weighted by its share of this process's rows; DDP syncs on the last pass
                with (accelerator.no_sync(trained) if number < len(parts) else contextlib.nullcontext()):
                    if frozen:
                        logits = trained(features[torch.as_tensor(part)])
                    else:
                        batch = padded_batch([encoded[i] for i in part], pad_id,
                                             left=judge.tokenizer.padding_side == "left")
                        logits = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    part_loss = loss_fn(logits, targets[torch.as_tensor(part)])
                    if len(parts) > 1:
                        part_loss = part_loss * (len(part) / len(mine))
                    (part_loss * weight).backward()  # even if not finite: every process joins DDP's sync
                local = local + part_loss.detach()
            loss = accelerator.reduce(local * weight, "mean")  # the whole batch's mean loss
            if not torch.isfinite(loss):
                _save_checkpoint(checkpoint, judge, optimizer, scheduler, step, fingerprint)
                raise RlhbError(f"{stage.stage}: the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                                f"checkpoint kept in {checkpoint}; lower --learning-rate")
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss += loss.item()
            window_count += 1
            done = step + 1
            rate = (done - start) / max(time.perf_counter() - started, 1e-9)
            progress.update(task, completed=done, loss=loss.item(), rate=rate)
            if done % settings.log_every == 0 or done == total:
                metrics.write({"step": done, "epoch": epoch + (k + 1) / steps_per_epoch,
                               "loss/train": window_loss / window_count, "lr": scheduler.get_last_lr()[0]})
                window_loss, window_count = 0.0, 0
            end_of_epoch = (k + 1) == steps_per_epoch
            if end_of_epoch:
                evaluation = evaluate()
                metrics.write({"step": done, "epoch": epoch + 1, **{f"eval/{k2}": v for k2, v in evaluation.items()
                                                                     if isinstance(v, (int, float))}})
                model.train()
            if end_of_epoch or (settings.checkpoint_every and done % settings.checkpoint_every == 0):
                _save_checkpoint(checkpoint, judge, optimizer, scheduler, done, fingerprint, (window_loss, window_count))
            if stage.stop_after_steps and done >= stage.stop_after_steps and done < total:
                _save_checkpoint(checkpoint, judge, optimizer, scheduler, done, fingerprint, (window_loss, window_count))
                raise StageStopped(f"stopped after {done} of {total} steps")
    if not evaluation:
        evaluation = evaluate()
    return evaluation
