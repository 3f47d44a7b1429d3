"""A PPO run's checkpoint and its saved policy: everything needed to go on exactly, and nothing more.

A checkpoint holds actor and critic (under LoRA: the adapters and the value head), the optimizer (under
DeepSpeed: every process's ZeRO part), the KL controller, the iteration (the data position is the
iteration alone), every process's torch RNG state, the reward source's own state when it learns, and the
probe's best. Under ZeRO-3 every process takes part in gathering the sharded weights, and the main
process writes. A checkpoint is written to a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from rlhb_cli import distributed, rundir, storage
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.lora import base_reference
from rlhb_cli.rl.sources import LearningRewardSource

if TYPE_CHECKING:  # (for the annotations only: the engine imports this module)
    from rlhb_cli.rl.ppo import PPOEngine

CHECKPOINT = "checkpoint.pt"


def trained_weights(engine: PPOEngine) -> dict | None:
    """Every weight of actor and critic, or under LoRA only the adapters and the value head: the frozen
    base is the starting policy's, on disk already. Under ZeRO-3 every process must call this: the shards
    are gathered layer by layer into the main process's memory (None on the others)."""
    lora = bool(engine.config.lora.r)
    if engine.zero3:
        return distributed.whole_state_dict(engine.model, trainable_only=lora)
    state = engine.unwrapped.state_dict()
    if not lora:
        return state
    trained = {name for name, p in engine.unwrapped.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def learning_source(engine: PPOEngine) -> LearningRewardSource | None:
    return engine.source if isinstance(engine.source, LearningRewardSource) else None


def _state(engine: PPOEngine, model_state: dict | None, rng_states: list | None, optimizer_states: list | None) -> dict:
    source = learning_source(engine)
    return {
        "model": model_state,
        "optimizer": optimizer_states if optimizer_states is not None else engine.optimizer.state_dict(),
        "kl": engine.kl.state_dict(), "iteration": engine.iteration, "zero_stage": engine.zero_stage,
        "rng": rng_states or [torch.get_rng_state()],  # one per process
        "source": source.state_dict() if source is not None else None,
        "probe": (engine.best_probe, engine.probes_since_best),
    }


def save_checkpoint(engine: PPOEngine, path: Path | None = None, all_processes: bool = True) -> None:
    """Written by the main process; `all_processes` (every process calls it) also keeps each one's RNG."""
    rng_states = None
    # ZeRO shards the optimizer's state: each process holds its part, and a resume needs every part
    optimizer_states = [engine.optimizer.state_dict()] if engine.under_deepspeed else None
    several = engine.accelerator.num_processes > 1
    # ZeRO-3's weights are gathered by every process together: a failure that reached one process only
    # keeps its optimizer part (its share of the fp32 weights) but no gathered weights
    model_state = None if engine.zero3 and several and not all_processes else trained_weights(engine)
    if all_processes and several:
        rng_states = gather_object([torch.get_rng_state()])
        if optimizer_states is not None:
            optimizer_states = gather_object(optimizer_states)
    if not engine.accelerator.is_main_process:
        return
    path = path or engine.stage.dir / CHECKPOINT
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(_state(engine, model_state, rng_states, optimizer_states) | {"fingerprint": engine.fingerprint}, tmp)
    os.replace(tmp, path)


def _launch(stage: int | None) -> str:
    return "without DeepSpeed" if stage is None else f"under DeepSpeed ZeRO-{stage}"


def load_checkpoint(engine: PPOEngine, path: Path) -> None:
    # (DeepSpeed's value classes are allowed whether this run is under DeepSpeed or not: a checkpoint written
    # under it is then refused by the check below, which says how to resume it)
    state = rundir.load_checkpoint_file(path, distributed.zero_checkpoint_classes())
    if state.get("fingerprint") != engine.fingerprint:
        raise RlhbError(f"{path}: made with another config or inputs; run without --resume to start over")
    # (checkpoints of earlier versions hold no stage: a sharded optimizer state there was ZeRO-2's)
    written = state.get("zero_stage", 2 if isinstance(state["optimizer"], list) else None)
    if written != engine.zero_stage:
        raise RlhbError(f"{path}: written {_launch(written)}, so its optimizer state does not fit a run "
                        f"{_launch(engine.zero_stage)}; resume it {_launch(written)}")
    if engine.zero3:  # the weights come back from the ZeRO-3 optimizer's fp32 partitions below
        expected = trained_weights(engine)
        unexpected = set(state["model"]) - set(expected) if expected is not None else set()
    else:
        _, unexpected = engine.unwrapped.load_state_dict(state["model"], strict=not engine.config.lora.r)
        expected = trained_weights(engine)
    absent = set(expected or ()) - set(state["model"])
    if unexpected or absent:
        raise RlhbError(f"{path}: its weights do not fit this model ({len(unexpected)} unexpected, "
                        f"{len(absent)} missing); run without --resume to start over")
    if engine.under_deepspeed:
        parts = state["optimizer"]
        if not isinstance(parts, list) or len(parts) != engine.accelerator.num_processes:
            raise RlhbError(f"{path}: not a checkpoint of this DeepSpeed run's {engine.accelerator.num_processes} "
                            f"processes (its optimizer state is sharded); resume with the same launch")
        # the ZeRO optimizer takes every process's part; its fp32 master weights come back exactly (under
        # ZeRO-3 they are the model's weights too, sharded: partitioned before, gathered again after, as
        # DeepSpeed's own checkpoint loading does)
        zero = engine.optimizer.optimizer
        if engine.zero3:
            zero.checkpoint_event_prologue()
        zero.load_state_dict(parts, load_from_fp32_weights=True)
        if engine.zero3:
            zero.checkpoint_event_epilogue()
    else:
        engine.optimizer.load_state_dict(state["optimizer"])
    engine.kl.load_state_dict(state["kl"])
    engine.iteration = state["iteration"]
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rng) == engine.accelerator.num_processes:
        torch.set_rng_state(rng[engine.accelerator.process_index])
    else:  # resumed on another number of processes: reproducible, though not the uninterrupted run
        torch.set_rng_state(rng[0])
        torch.manual_seed(int(torch.randint(2**31, (1,))) + engine.accelerator.process_index)
    source = learning_source(engine)
    if state["source"] is not None and source is not None:
        if "collapse" in state:  # written before the collapse watch moved into the discriminator's source
            state["source"].setdefault("collapse", state["collapse"])
        source.load_state_dict(state["source"])
    engine.best_probe, engine.probes_since_best = state["probe"]


def trained_states(engine: PPOEngine) -> list[dict]:
    """Every weight this process trains: policy, critic and a learning reward source's model (under ZeRO-3
    the policy's and critic's are one sharded copy, not one per process: nothing of theirs to compare)."""
    states = [] if engine.zero3 else [engine.unwrapped.state_dict()]
    source = learning_source(engine)
    if source is not None and isinstance(source.state_dict(), dict):
        states.append(source.state_dict().get("model", {}))
    return states


def save_policy(engine: PPOEngine, path: Path, policy_meta: dict) -> None:
    """Every process calls it (under ZeRO-3 they gather the weights together); the main one writes."""
    actor_state = None
    if engine.zero3:
        gathered = trained_weights(engine)
        actor_state = gathered and {k.removeprefix("actor."): v for k, v in gathered.items() if k.startswith("actor.")}
    if not engine.accelerator.is_main_process:
        return
    if engine.config.lora.r:  # the adapters alone; loading a policy merges them into this base
        policy_meta = policy_meta | {"lora_base": base_reference(engine.policy_path, path)}
    with storage.atomic_dir(path) as tmp:
        engine.unwrapped.actor.save_pretrained(str(tmp), state_dict=actor_state)
        engine.tokenizer.save_pretrained(str(tmp))
        (tmp / "policy.json").write_text(json.dumps(policy_meta, indent=2), encoding="utf-8")
