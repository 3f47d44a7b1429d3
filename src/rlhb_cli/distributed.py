"""Several processes, one run: what every stage needs to run under `torchrun` or `accelerate launch`.

Every process runs the same stage on its share of the data; only the main process (rank 0) writes the
run directory, so the other processes' writes go to scratch space and vanish. Whatever one process
builds and the others then read (a tokenizer trained on the fly, a model saved for the next stage) is
made under `main_process_first()` or followed by `wait_for_everyone()`. With one process all of this
is free: nothing is initialised and nothing waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from typing import Iterable, Iterator

import numpy as np

from rlhb_cli.errors import RlhbError


def process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def num_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process(total: int, option: str) -> int:
    """A batch size given as the total of one optimizer step, split evenly among the processes."""
    if total % num_processes():
        raise RlhbError(f"{option} {total} must divide among the {num_processes()} processes")
    return total // num_processes()


def accumulation(total: int, micro: int) -> tuple[int, int]:
    """(rows per forward pass on each process, passes per optimizer step) for `--batch-size` `total` in
    passes of `--micro-batch-size` `micro` (0: one pass). Gradients add up over the passes."""
    per = per_process(total, "--batch-size")
    if micro < 0:
        raise RlhbError(f"--micro-batch-size {micro}: give 0 (one pass) or a positive number of rows")
    if micro == 0 or micro >= per:
        return per, 1
    if per % micro:
        share = f"the {per} rows of --batch-size {total} that each of the {num_processes()} processes takes" \
            if num_processes() > 1 else f"--batch-size {total}"
        raise RlhbError(f"--micro-batch-size {micro} must divide {share}")
    return micro, per // micro


def is_main_process() -> bool:
    """Under torchrun / accelerate launch every process runs the stage; only rank 0 writes the run dir."""
    return process_index() == 0


def deepspeed_requested() -> bool:
    """Launched with a DeepSpeed config (`accelerate launch --config_file ...deepspeed...`)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def zero3_sharded(module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds `module`'s weights sharded across processes (each parameter then has a
    `ds_id`; outside a forward pass its tensor is this process's shard, often empty)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def whole_state_dict(engine, trainable_only: bool = False) -> dict | None:
    """Under ZeRO-3, the DeepSpeed `engine`'s weights whole, gathered layer by layer into the main process's
    memory (so no device ever holds more than a layer of them beyond its shard), as DeepSpeed saves a model:
    a state dict there, None on the other processes. Every process must call it."""
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)


@contextlib.contextmanager
def weights_to_change(module) -> Iterator[None]:
    """Under ZeRO-3 (with its zero3_init_flag) a model is sharded as it loads; changing its weights outside
    training (merging LoRA adapters into them) needs them whole: gathered for the block, the main process's
    changed weights sharded again after it. Elsewhere it does nothing."""
    if not zero3_sharded(module):
        yield
        return
    # deferred: optional, installed only for ZeRO runs
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        yield


@contextlib.contextmanager
def gathered_weights(engine, module) -> Iterator[None]:
    """Under ZeRO-3, `module` (a part of the DeepSpeed `engine`'s model) with its weights whole on every process
    for the block, for what reads them outside training: generating, scoring. DeepSpeed's hooks, which gather
    and release each layer's weights around its forward, are off meanwhile (trl does the same for
    generation). Every process must enter the block. Elsewhere it does nothing."""
    if not zero3_sharded(module):
        yield
        return
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


def refuse_passes_under_deepspeed(micro_batch_size: int) -> None:
    """The RL engine adds up passes itself; DeepSpeed's engine keeps its own
    count of passes per step, so the two would disagree on when to step. (Trainer's stages agree with it.)"""
    if micro_batch_size and deepspeed_requested():
        raise RlhbError(f"--micro-batch-size {micro_batch_size} is not supported under DeepSpeed in this stage; "
                        f"leave it at 0 and lower the batch size instead")


def _state():
    """accelerate's process state (it sets up the process group once: gloo on CPU, nccl on GPU)."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def wait_for_everyone() -> None:
    if num_processes() > 1:
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (building and saving, say); the others then run it and find it done."""
    if not is_main_process():
        wait_for_everyone()
    yield
    if is_main_process():
        wait_for_everyone()


def weights_digest(state_dicts: Iterable[dict]) -> str:
    """sha256 over the tensors of some state dicts, by sorted name: equal only for the very same weights."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    import torch
    digest = hashlib.sha256()
    for state in state_dicts:
        for name, tensor in sorted(state.items()):
            if torch.is_tensor(tensor):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(digest: str) -> dict:
    """Data-parallel processes must end with the very same weights; a difference is a bug worth stopping for."""
    digests = [digest]
    if num_processes() > 1:
        # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
        from accelerate.utils import gather_object
        _state()
        digests = gather_object([digest])
    if len(set(digests)) != 1:
        raise RlhbError(f"the {len(digests)} processes ended with different weights ({', '.join(d[:12] for d in digests)})"
                        "; the run is not data-parallel as it should be")
    return {"processes": len(digests), "processes_in_sync": True, "weights_sha256": digests[0]}


def processes_summary(*state_dicts: dict, sharded: bool = False) -> dict:
    """For a stage's summary: how many processes trained, and (with more than one) proof that they all
    hold the very same weights (those of `state_dicts`). Weights `sharded` by ZeRO-3 are one copy split
    between the processes: nothing to compare."""
    if num_processes() == 1:
        return {"processes": 1}
    if sharded:
        return {"processes": num_processes(), "weights_sharded": True}
    return check_in_sync(weights_digest(state_dicts))


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators, once, where a stage starts."""
    import torch  # (deferred: this module is read by `rlhb status`, which needs no torch)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_count(model, trainable_only: bool = False) -> int:
    """Weights of a model, whole (under DeepSpeed ZeRO-3 a parameter's own tensor is only this process's shard)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


# DeepSpeed's own value classes in its ZeRO optimizer's state (loss scaler, stage enum, slice addresses)
ZERO_STATE_CLASSES = (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                      ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                      ("deepspeed.utils.tensor_fragment", ("fragment_address",)))


def zero_checkpoint_classes() -> tuple[type, ...]:
    """The classes a checkpoint of a DeepSpeed run may hold besides tensors and plain values: allowed by name
    when it resumes, and nothing else."""
    import importlib  # (deferred: deepspeed is optional, and heavy)
    found = []
    for module_name, names in ZERO_STATE_CLASSES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return tuple(found)
