"""`rlhb train-reward`: the RLHF baseline's reward model, Bradley-Terry on preference pairs (trl RewardTrainer).

Pairs (prompt, chosen, rejected) come from the simulator's annotators (the run's preferences.jsonl,
the default), the importers (`--pairs` of `rlhb import ...`), or any JSONL file of one's own. Bad lines
are written to rejected.jsonl with their reason. Pairs are split by prompt; the headline is the
validation pairwise accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


from rlhb_cli import distributed, rundir, storage
from rlhb_cli.behaviors.prepare import sealed_queries, split_queries
from rlhb_cli.config import field
from rlhb_cli.distributed import param_count, seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.judge import Judge, JudgeMeta
from rlhb_cli.prompts import judge_text
from rlhb_cli.rundir import MetricsLog
from rlhb_cli.stages.common import (judge_backbone, mean_train_loss, stop_if_unfinished,
                                   trainer_resume_point, trl_config)
from rlhb_cli.stages.sft import trainer_callback

STAGE = "train-reward"


@dataclass
class RewardConfig:
    pairs: Path | None = field(None, help="JSONL of prompt / chosen / rejected; default: the run's simulate-logs pairs.")
    backbone: str = field("sft", help="sft (the SFT policy's body), tiny (fresh), minilm (pretrained encoder) or a path.")
    max_length: int = field(192, help="Tokens of judge input kept (question, answer).")
    epochs: float = field(2.0, help="Passes over the training pairs.")
    batch_size: int = field(16, help="Pairs per optimizer step (in all, split among the processes of a launcher).")
    micro_batch_size: int = field(0, help="Pairs per forward and backward pass on each process; gradients add up "
                                          "over the passes of an optimizer step (0: one pass). Less activation memory.")
    learning_rate: float = field(3e-4, help="Peak learning rate.")
    validation_fraction: float = field(0.15, help="Share of prompts whose pairs are held out.")
    max_reject_ratio: float = field(0.1, help="Fail when more than this share of pair lines is bad.")
    checkpoint_every: int = field(100, help="Optimizer steps between checkpoints.")
    seed: int = field(0, help="Seed of the split, initialisation and data order.")

    def __post_init__(self):
        distributed.accumulation(self.batch_size, self.micro_batch_size)  # refused before the stage starts
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def read_pairs(path: Path) -> tuple[list[dict], list[dict], int]:
    """(good pairs, rejected lines with reasons, lines read)."""
    good, rejected, seen = [], [], 0
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise RlhbError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        seen += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append({"line": number, "reason": f"not valid JSON ({exc.msg})"})
            continue
        if not isinstance(row, dict):
            rejected.append({"line": number, "reason": "not a JSON object"})
            continue
        problem = next((f"missing or empty field '{k}'" for k in ("prompt", "chosen", "rejected")
                        if not isinstance(row.get(k), str) or not row[k].strip()), None)
        if problem is None and row["chosen"] == row["rejected"]:
            problem = "chosen and rejected are the same text"
        if problem:
            rejected.append({"line": number, "field": None, "reason": problem})
            continue
        good.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "line": number})
    return good, rejected, seen


def run(config: RewardConfig, stage: rundir.StageRun) -> dict:
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    import datasets
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig as TrlRewardConfig, RewardTrainer

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    started = time.perf_counter()
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    if config.pairs is not None:
        pairs_path = Path(config.pairs)
        if not pairs_path.is_file():
            raise RlhbError(f"{pairs_path}: no such file")
    else:
        simulated = run_dir / "simulate-logs"
        if not (simulated / "preferences.jsonl").exists():
            raise RlhbError(f"no preference pairs: give --pairs FILE (JSONL of prompt, chosen, rejected) or run "
                            f"`rlhb simulate-logs --run-dir {run_dir}` first")
        rundir.require_stage(run_dir, "simulate-logs")
        stage.add_upstream("simulate-logs")
        pairs_path = simulated / "preferences.jsonl"
    stage.add_input("pairs", pairs_path)
    pairs, rejected, seen = read_pairs(pairs_path)
    sealed = sealed_queries(run_dir)  # pairs about the sealed split's queries would let RLHF see them
    stage.manifest["splits_read"] = []  # none of the logs' splits: its own pairs, less those of sealed queries
    if sealed:
        stage.add_upstream("prepare-behaviors")
    left_out = [p for p in pairs if p["prompt"] in sealed]
    pairs = [p for p in pairs if p["prompt"] not in sealed]
    ledger = rejected + [{"line": p["line"], "field": "prompt", "reason": "a sealed test query (left out, so that "
                          "evaluation on it stays unseen)"} for p in left_out]
    storage.atomic_write_text(stage.dir / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in ledger))
    if seen == 0:
        raise RlhbError(f"{pairs_path}: empty file, no pairs")
    if len(rejected) / seen > config.max_reject_ratio:
        first = rejected[0]
        raise RlhbError(f"{pairs_path}: {len(rejected)} of {seen} lines are bad, more than --max-reject-ratio "
                        f"{config.max_reject_ratio}; first: line {first['line']}: {first['reason']}")
    split = split_queries(sorted({p["prompt"] for p in pairs}), config.seed, config.validation_fraction, 0.0)
    train = [p for p in pairs if split[p["prompt"]] == "train"]
    validation = [p for p in pairs if split[p["prompt"]] == "validation"]
    if len(validation) < 2 or len(train) < config.batch_size:
        raise RlhbError(f"{pairs_path}: {len(pairs)} good pairs are too few to split into training "
                        f"({len(train)}) and validation ({len(validation)}); give more pairs")

    def as_texts(rows):
        return {"chosen": [judge_text(p["prompt"], p["chosen"]) for p in rows],
                "rejected": [judge_text(p["prompt"], p["rejected"]) for p in rows]}

    notes: list[str] = []
    corpus = lambda: [t for p in train for t in (judge_text(p["prompt"], p["chosen"]), p["rejected"])]  # noqa: E731
    model, tokenizer = judge_backbone(config.backbone, run_dir, stage, 1, corpus, notes)
    if tokenizer.eos_token is None:  # trl closes each sequence with EOS; encoders such as MiniLM have SEP instead
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
        notes.append(f"the tokenizer has no EOS token; {tokenizer.eos_token!r} closes each sequence instead")
    per_pass, passes = distributed.accumulation(config.batch_size, config.micro_batch_size)
    args = trl_config(
        TrlRewardConfig,
        output_dir=str(stage.dir / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=per_pass, gradient_accumulation_steps=passes, per_device_eval_batch_size=32,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
        logging_steps=1, eval_strategy="epoch", save_strategy="steps", save_steps=config.checkpoint_every,
        save_total_limit=1, seed=config.seed, data_seed=config.seed, max_length=config.max_length,
        center_rewards_coefficient=None,
    )
    truncated = [0]

    def as_ids(rows) -> "datasets.Dataset":
        """Token ids cut to max_length with their closing token kept: trl would drop a longer pair unsaid."""
        out = {}
        for side, texts in as_texts(rows).items():
            ids = tokenizer([t + tokenizer.eos_token for t in texts])["input_ids"]
            truncated[0] += sum(len(i) > config.max_length for i in ids)
            out[f"{side}_ids"] = [i if len(i) <= config.max_length else i[:config.max_length - 1] + i[-1:] for i in ids]
        return datasets.Dataset.from_dict(out)

    metrics = MetricsLog(stage.dir / "metrics.jsonl", stage.trackers)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=as_ids(train),
                            eval_dataset=as_ids(validation),
                            callbacks=[trainer_callback(stage, metrics, STAGE)])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=trainer_resume_point(stage, metrics))
    stop_if_unfinished(trainer)
    # under ZeRO-3 the weights are sharded: whole on every process while the judge is saved and scored
    with distributed.gathered_weights(trainer.model_wrapped, trainer.model):
        judge = Judge(trainer.model, tokenizer, JudgeMeta(kind="reward", max_length=config.max_length, with_behavior=False))
        judge.save(stage.dir / "model")

        val = as_texts(validation)
        chosen = judge.logits(val["chosen"]).squeeze(-1).numpy()
        rejected_scores = judge.logits(val["rejected"]).squeeze(-1).numpy()
        train_texts = as_texts(train)
        train_accuracy = float((judge.logits(train_texts["chosen"]).squeeze(-1).numpy() >
                                judge.logits(train_texts["rejected"]).squeeze(-1).numpy()).mean())
        in_sync = distributed.processes_summary(trainer.model.state_dict())
    return {
        "val_pairwise_accuracy": round(float((chosen > rejected_scores).mean()), 4),
        "train_pairwise_accuracy": round(train_accuracy, 4),
        "val_margin_mean": round(float((chosen - rejected_scores).mean()), 4),
        "train_loss": mean_train_loss(trainer),
        "pairs_in": seen,
        "pairs_rejected": len(rejected),
        "pairs_sealed": len(left_out),
        "answers_truncated": truncated[0],  # answers (with their query) cut to --max-length tokens, not dropped
        "pairs_train": len(train),
        "pairs_validation": len(validation),
        "backbone": config.backbone,
        "parameters": param_count(trainer.model),
        "notes": notes,
        **in_sync,
        "seconds": round(time.perf_counter() - started, 1),
    }
