"""The training loop of the judges (discriminator, behaviour classifier): plain PyTorch, resumable.

Texts are tokenized once. The batch order of epoch e is a permutation seeded by (seed, e), so a run
resumed from a checkpoint (model, optimizer, schedule, RNG state, step) sees exactly the batches the
uninterrupted run would have, and ends with the same numbers.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rlhb_cli.errors import RlhbError
from rlhb_cli.models.judge import Judge
from rlhb_cli.rundir import StageRun, StageStopped
from rlhb_cli.stages.common import MetricsLog, progress_bar

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


def _pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _save_checkpoint(path, judge, optimizer, scheduler, step, fingerprint, window=(0.0, 0)) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": judge.model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step,
                "fingerprint": fingerprint, "loss_window": window}, tmp)
    os.replace(tmp, path)


def train_judge(judge: Judge, texts: list[str], targets: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], settings: LoopSettings,
                stage: StageRun, evaluate: Callable[[], dict], fingerprint: str) -> dict:
    """Train `judge` on (texts, targets); evaluate after every epoch; returns the last evaluation."""
    encoded = judge.tokenizer(texts, truncation=True, max_length=judge.meta.max_length)["input_ids"]
    n = len(encoded)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    model = judge.model
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate, total_steps=total,
                                                    pct_start=settings.warmup_fraction, anneal_strategy="cos")
    metrics = MetricsLog(stage.dir / "metrics.jsonl")
    checkpoint = stage.dir / CHECKPOINT
    start = 0
    if stage.resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise RlhbError(f"{checkpoint}: made with another config or data; run without --resume to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        resumed_window = state.get("loss_window", (0.0, 0))
        metrics.keep_until(start)
    else:
        resumed_window = (0.0, 0)
        metrics.keep_until(-1)
        torch.manual_seed(settings.seed)
    model.train()
    pad_id = judge.tokenizer.pad_token_id
    evaluation: dict = {}
    (window_loss, window_count), started = resumed_window, time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(stage.stage, total=total, completed=start, loss=float("nan"), rate=0.0)
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            order = np.random.default_rng([settings.seed, epoch]).permutation(n)
            index = order[k * settings.batch_size:(k + 1) * settings.batch_size]
            batch = _pad([encoded[i] for i in index], pad_id)
            loss = loss_fn(judge.forward_logits(batch), targets[torch.as_tensor(index)])
            if not torch.isfinite(loss):
                _save_checkpoint(checkpoint, judge, optimizer, scheduler, step, fingerprint)
                raise RlhbError(f"{stage.stage}: the loss became {loss.item()} at step {step + 1} (epoch {epoch + 1}); "
                                f"checkpoint kept in {checkpoint}; lower --learning-rate")
            loss.backward()
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
