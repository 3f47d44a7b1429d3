"""`rlhb train-classifier`: the RLHBC behaviour classifier and its reward.

One pointwise model over (query, response) with one head per behaviour metric, each an N-way
classification of that metric's bin, trained with cross-entropy summed over heads. Its reward,
`BehaviorClassifier.expected_behavior`, decodes expected counts from the bin probabilities (each bin
stands for the mean count, or per-view rate, of the training rows in it) and computes the shaped reward
from them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rlhb_cli import distributed, rundir
from rlhb_cli.behaviors.prepare import load_prepared
from rlhb_cli.behaviors.binning import METRICS
from rlhb_cli.config import config_to_dict, field
from rlhb_cli.distributed import param_count, seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.classifier import BehaviorClassifier
from rlhb_cli.models.judge import Judge, JudgeMeta, body_learning
from rlhb_cli.prompts import judge_text
from rlhb_cli.stages.common import judge_backbone
from rlhb_cli.stages.judge_training import LoopSettings, train_judge
from rlhb_cli.stats import spearman

STAGE = "train-classifier"


@dataclass
class ClassifierConfig:
    backbone: str = field("sft", help="sft (the SFT policy's body), tiny (fresh), minilm (pretrained encoder) or a path.")
    freeze_backbone: bool = field(False, help="Learn only the head (pooler and classifier) on the backbone's frozen "
                                              "features, read once per text. Needs a BERT-style encoder (minilm).")
    train_top_layers: int = field(0, help="Learn only the top K layers of the backbone and the head; the embeddings "
                                          "and lower layers stay as loaded (no backward through them). 0: all.")
    heads: list[str] = field(help="Behaviour metrics to predict, one head each.", factory=lambda: list(METRICS))
    max_length: int = field(192, help="Tokens of judge input kept (question, answer).")
    epochs: Optional[int] = field(None, help="Passes over the training rows. Default: 3, or 8 with a frozen backbone.")
    batch_size: int = field(32, help="Rows per optimizer step (in all, split among the processes of a launcher).")
    micro_batch_size: int = field(0, help="Rows per forward and backward pass on each process; gradients add up "
                                          "over the passes of an optimizer step (0: one pass). Less activation memory.")
    learning_rate: Optional[float] = field(None, help="Peak learning rate of the one-cycle schedule. Default: 3e-4, "
                                                      "or 2e-2 for a head alone on a frozen backbone.")
    weight_decay: float = field(0.01, help="AdamW weight decay on matrices.")
    warmup_fraction: float = field(0.1, help="Share of steps rising to the peak learning rate.")
    max_train_rows: int = field(0, help="Use at most this many training rows (0: all).")
    checkpoint_every: int = field(200, help="Optimizer steps between checkpoints (and at every epoch end).")
    seed: int = field(0, help="Seed of initialisation and batch order.")

    def __post_init__(self):
        distributed.accumulation(self.batch_size, self.micro_batch_size)  # refused before the stage starts
        # Defaults that depend on freezing are resolved here, so the manifest records the values used.
        if self.epochs is None:
            self.epochs = 8 if self.freeze_backbone else 3
        if self.learning_rate is None:
            self.learning_rate = 2e-2 if self.freeze_backbone else 3e-4
        body_learning(self.freeze_backbone, self.train_top_layers)
        unknown = [h for h in self.heads if h not in METRICS]
        if unknown or not self.heads:
            raise ValueError(f"heads must be among {', '.join(METRICS)}, got {self.heads}")


def decoding_table(train, heads: dict[str, int], basis: str) -> dict:
    """What each bin stands for: mean count and mean per-view rate of the training rows in it."""
    pv = np.asarray(train["pv"], dtype=np.float64)
    table = {"basis": basis, "mean_count": {}, "mean_rate": {}, "overall": {"mean_count": {}, "mean_rate": {}}}
    for metric in METRICS:
        count = np.asarray(train[metric], dtype=np.float64)
        rate = np.where(pv > 0, count / np.where(pv > 0, pv, 1), 0.0)
        table["overall"]["mean_count"][metric] = float(count.mean())
        table["overall"]["mean_rate"][metric] = float(rate.mean())
        if metric in heads:
            bins = np.asarray(train[f"{metric}_bin"])
            table["mean_count"][metric] = [float(count[bins == k].mean()) if (bins == k).any() else 0.0
                                           for k in range(heads[metric])]
            table["mean_rate"][metric] = [float(rate[bins == k].mean()) if (bins == k).any() else 0.0
                                          for k in range(heads[metric])]
    return table


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top class, in equal-width confidence bins."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def macro_f1(predicted: np.ndarray, labels: np.ndarray, classes: int) -> float:
    scores = []
    for k in range(classes):
        tp = ((predicted == k) & (labels == k)).sum()
        fp = ((predicted == k) & (labels != k)).sum()
        fn = ((predicted != k) & (labels == k)).sum()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def run(config: ClassifierConfig, stage: rundir.StageRun) -> dict:
    started = time.perf_counter()
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    data, spec, _ = load_prepared(run_dir, stage, min_validation=2)
    train = data["train"]
    if config.max_train_rows and len(train) > config.max_train_rows:
        train = train.select(range(config.max_train_rows))
    validation = data["validation"]
    heads = {m: spec.levels(m) for m in METRICS if m in config.heads}
    labels = {m: np.asarray(train[f"{m}_bin"]) for m in heads}
    for metric, values in labels.items():
        if len(np.unique(values)) < 2:
            others = ",".join(h for h in heads if h != metric) or "another metric"
            raise RlhbError(f"head '{metric}' has a single class in the training rows: nothing to learn; "
                            f"leave it out with --heads {others}")
    notes: list[str] = []
    model, tokenizer = judge_backbone(config.backbone, run_dir, stage, sum(heads.values()), train, notes)
    judge = Judge(model, tokenizer, JudgeMeta(kind="classifier", max_length=config.max_length, with_behavior=False,
                                              heads=heads, extra=decoding_table(train, heads, spec.basis) |
                                              body_learning(config.freeze_backbone, config.train_top_layers)))
    texts = [judge_text(q, r) for q, r in zip(train["query"], train["response"])]
    targets = torch.tensor(np.stack([labels[m] for m in heads], axis=1), dtype=torch.long)
    val_texts = [judge_text(q, r) for q, r in zip(validation["query"], validation["response"])]
    val_labels = {m: np.asarray(validation[f"{m}_bin"]) for m in heads}
    majority = {m: int(np.bincount(labels[m]).argmax()) for m in heads}

    def loss_fn(logits, target):
        loss, start = 0.0, 0
        for h, size in enumerate(heads.values()):
            loss = loss + torch.nn.functional.cross_entropy(logits[:, start:start + size], target[:, h])
            start += size
        return loss

    def evaluate() -> dict:
        classifier = BehaviorClassifier(judge)
        probs = classifier.probabilities(validation["query"], validation["response"]) if val_texts else {}
        out = {}
        for metric in heads:
            predicted = probs[metric].argmax(1)
            out[f"{metric}/accuracy"] = float((predicted == val_labels[metric]).mean())
            out[f"{metric}/majority_accuracy"] = float((val_labels[metric] == majority[metric]).mean())
            out[f"{metric}/macro_f1"] = macro_f1(predicted, val_labels[metric], heads[metric])
            out[f"{metric}/ece"] = calibration_error(probs[metric], val_labels[metric])
        return out

    settings = LoopSettings(config.epochs, config.batch_size, config.learning_rate, config.weight_decay,
                            config.warmup_fraction, 1.0, config.seed, config.checkpoint_every,
                            micro_batch_size=config.micro_batch_size)
    fingerprint = hashlib.sha256(json.dumps([config_to_dict(config), stage.manifest["upstream"]],
                                            sort_keys=True).encode()).hexdigest()
    final = train_judge(judge, texts, targets, loss_fn, settings, stage, evaluate, fingerprint)
    judge.save(stage.dir / "model")

    classifier = BehaviorClassifier(judge)
    probs = classifier.probabilities(validation["query"], validation["response"])
    per_head = {}
    for metric in heads:
        predicted = probs[metric].argmax(1)
        confusion = np.zeros((heads[metric], heads[metric]), dtype=int)
        np.add.at(confusion, (val_labels[metric], predicted), 1)
        per_head[metric] = {"accuracy": round(final[f"{metric}/accuracy"], 4),
                            "majority_accuracy": round(final[f"{metric}/majority_accuracy"], 4),
                            "macro_f1": round(final[f"{metric}/macro_f1"], 4),
                            "ece": round(final[f"{metric}/ece"], 4),
                            "confusion": confusion.tolist()}
    expected = classifier.expected_behavior(validation["query"], validation["response"])["shaped_reward"]
    actual = np.asarray(validation["shaped_reward"])
    rank_corr = spearman(expected, actual) if len(actual) > 2 else None
    rank_corr = None if rank_corr is not None and np.isnan(rank_corr) else rank_corr
    return {
        "heads": per_head,
        "all_heads_beat_majority": all(h["accuracy"] > h["majority_accuracy"] for h in per_head.values()),
        "mean_accuracy_gain": round(float(np.mean([h["accuracy"] - h["majority_accuracy"] for h in per_head.values()])), 4),
        "macro_f1_mean": round(float(np.mean([h["macro_f1"] for h in per_head.values()])), 4),
        "val_reward_rank_correlation": round(rank_corr, 4) if rank_corr is not None else None,
        "train_rows": len(train),
        "backbone": config.backbone,
        "frozen_backbone": config.freeze_backbone,
        "trained_top_layers": config.train_top_layers,
        "parameters": param_count(model),
        "parameters_trained": param_count(model, trainable_only=True),
        "notes": notes,
        **distributed.processes_summary(model.state_dict()),
        "seconds": round(time.perf_counter() - started, 1),
    }
