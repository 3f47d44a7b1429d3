"""What the supervised training stages share: judge backbones, the tiny tokenizer's corpus, progress, the
Trainer's resume point and config."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rlhb_cli import distributed, rundir, storage
from rlhb_cli.models.load import TinyModelSpec, load_sequence_classifier, minilm_path, tiny_llama_config
from rlhb_cli.models.tokenizer import train_tokenizer
from rlhb_cli.prompts import generator_prompt


def corpus_of(train) -> list[str]:
    """Texts a tiny tokenizer is trained on: prompts as the policy sees them, and the responses."""
    texts = [generator_prompt(q, b) for q, b in zip(train["query"], train["behavior_text"])]
    return texts + list(train["response"])


def judge_backbone(name: str, run_dir: Path, stage: rundir.StageRun, num_labels: int, corpus, notes: list[str],
                   spec: TinyModelSpec | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) of a judge: from the SFT policy's body, a fresh tiny model, MiniLM, or a path.

    `corpus` is what a fresh tiny tokenizer is trained on: a prepared split, or a function giving texts.
    """
    if name == "sft":
        policy = rundir.require_stage(run_dir, "train-sft") / "policy"
        stage.add_upstream("train-sft")
        return load_sequence_classifier(policy, num_labels, notes)
    if name == "tiny":
        # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
        from transformers import LlamaForSequenceClassification
        init = stage.dir / "init"
        with distributed.main_process_first():  # built once, by the main process; the others read it
            if not (init / "config.json").exists():
                tokenizer = train_tokenizer(corpus() if callable(corpus) else corpus_of(corpus),
                                            (spec or TinyModelSpec()).vocab_size)
                config = tiny_llama_config(spec or TinyModelSpec(), tokenizer)
                config.num_labels = num_labels
                model = LlamaForSequenceClassification(config)
                with storage.atomic_dir(init) as tmp:
                    model.save_pretrained(str(tmp))
                    tokenizer.save_pretrained(str(tmp))
        return load_sequence_classifier(init, num_labels, notes)
    if name == "minilm":
        return load_sequence_classifier(minilm_path(), num_labels, notes)
    return load_sequence_classifier(Path(name), num_labels, notes, trust_remote_code)


def progress_bar():
    """A rich progress bar with loss and rate, on stderr (quiet when stderr is not a terminal, and in all
    processes but the main one)."""
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} it/s"),
                    TimeRemainingColumn(), console=console, transient=True,
                    disable=not (console.is_terminal and distributed.is_main_process()))


def trainer_resume_point(stage: rundir.StageRun, metrics: rundir.MetricsLog) -> str | None:
    """The newest complete transformers Trainer checkpoint to resume from (with --resume), metrics.jsonl
    cut to match. transformers writes trainer_state.json last into a checkpoint, so one whose state does
    not read whole was cut short (a full disk, a kill during the save): it is removed, and the complete one
    before it is taken."""
    checkpoints = sorted((stage.dir / "checkpoints").glob("checkpoint-*"), key=_checkpoint_step)
    if not stage.resume:
        metrics.keep_until(-1)
        return None
    while checkpoints and not _complete(checkpoints[-1]):
        if distributed.is_main_process():
            shutil.rmtree(checkpoints[-1], ignore_errors=True)
        checkpoints.pop()
    distributed.wait_for_everyone()
    if not checkpoints:
        metrics.keep_until(-1)
        return None
    metrics.keep_until(_checkpoint_step(checkpoints[-1]))
    return str(checkpoints[-1])


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def _complete(checkpoint: Path) -> bool:
    try:
        state = rundir.read_json(checkpoint / "trainer_state.json")
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == _checkpoint_step(checkpoint)


def mean_train_loss(trainer) -> float:
    """The training loss averaged over every step of the stage, resumed or not. transformers' own figure
    averages only the steps since the resume; the Trainer logs every step (logging_steps=1) and its log
    comes back from the checkpoint, so the mean of the logged losses is the uninterrupted run's."""
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return round(sum(losses) / len(losses), 4) if losses else float("nan")


def evaluate_before_training(trainer) -> dict:
    """`trainer.evaluate()` on the untrained model. accelerate marks a model it prepared for evaluation as
    prepared, so the training that follows would not wrap it in DDP, and under a launcher every process
    would train alone (measured: the processes ended with different weights). The mark is lifted here."""
    metrics = trainer.evaluate()
    if getattr(trainer.model, "_is_accelerate_prepared", False):
        trainer.model._is_accelerate_prepared = False
    return metrics


def stop_if_unfinished(trainer) -> None:
    """A Trainer stopped by --stop-after-steps leaves the stage `stopped`, not done."""
    if trainer.state.global_step < trainer.state.max_steps:
        raise rundir.StageStopped(f"stopped after {trainer.state.global_step} of {trainer.state.max_steps} steps")


def trl_config(config_cls, **kwargs):
    """A trl config, on the CPU unless there is a GPU. trl still passes transformers' renamed
    `gradient_checkpointing`, whose deprecation warning says nothing a user could act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        return config_cls(bf16=False, fp16=False, report_to="none", gradient_checkpointing=False,
                          use_cpu=not torch.cuda.is_available() and not distributed.deepspeed_requested(),
                          disable_tqdm=True, dataloader_num_workers=0, **kwargs)
