"""`rlhb warmup-discriminator`: learn to tell a real (query, response, behaviour) triplet from a fake.

Real: logged triplets. Fake: the same (query, response) with its behaviour replaced, by three
strategies mixed by `fake_*` weights: a random other row's behaviour; another response's behaviour for
the same query (hard: the text alone must tell); the row's own bin pattern shifted away from the truth.
The headline is the validation AUC against random replacement, the setting whose Bayes-optimal AUC
simulate-logs reports, so the gap to the ceiling is visible.
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
from rlhb_cli.models.discriminator import Discriminator, factorized_tables, make_fakes
from rlhb_cli.models.judge import Judge, JudgeMeta, body_learning
from rlhb_cli.prompts import judge_text
from rlhb_cli.stages.common import judge_backbone
from rlhb_cli.stages.judge_training import LoopSettings, train_judge
from rlhb_cli.stats import auc

STAGE = "warmup-discriminator"


@dataclass
class DiscriminatorConfig:
    backbone: str = field("sft", help="sft (the SFT policy's body), tiny (fresh), minilm (pretrained encoder) or a path.")
    freeze_backbone: bool = field(False, help="Learn only the head (pooler and classifier) on the backbone's frozen "
                                              "features, read once per text: minutes instead of tens of minutes with "
                                              "minilm. Needs a BERT-style encoder.")
    train_top_layers: int = field(0, help="Learn only the top K layers of the backbone and the head; the embeddings "
                                          "and lower layers stay as loaded (no backward through them). 0: all.")
    form: str = field("factorized", help="factorized: logit = sum over metrics of log p(bin | query, response) - log "
                                         "p(behaviour), the Bayes-optimal form; joint: one logit read from the "
                                         "behaviour text beside the query and response.")
    likelihood_weight: float = field(1.0, help="factorized: weight of the per-metric cross-entropy on real rows "
                                               "added to the real/fake loss.")
    max_length: int = field(192, help="Tokens of judge input kept (behaviour, question, answer).")
    epochs: Optional[int] = field(None, help="Passes over the training triplets. Default: 3, or 8 with a frozen "
                                             "backbone (its passes take seconds; measured: AUC still rising at 4).")
    batch_size: int = field(32, help="Triplets per optimizer step (in all, split among the processes of a launcher).")
    micro_batch_size: int = field(0, help="Triplets per forward and backward pass on each process; gradients add up "
                                          "over the passes of an optimizer step (0: one pass). Less activation memory.")
    learning_rate: Optional[float] = field(None, help="Peak learning rate of the one-cycle schedule. Default: 3e-4, "
                                                      "or 2e-2 for a head alone on a frozen backbone (measured: "
                                                      "1e-3 and 5e-3 underfit in 4 epochs).")
    weight_decay: float = field(0.01, help="AdamW weight decay on matrices.")
    warmup_fraction: float = field(0.1, help="Share of steps rising to the peak learning rate.")
    label_smoothing: float = field(0.0, help="Targets become 1 - s and s instead of 1 and 0.")
    fake_per_real: float = field(1.0, help="Fake triplets made per real one.")
    fake_random: float = field(0.25, help="Weight of fakes with a random other row's behaviour.")
    fake_same_query: float = field(0.5, help="Weight of fakes with another response's behaviour for the same query.")
    fake_shifted: float = field(0.25, help="Weight of fakes whose bin pattern is shifted away from the truth.")
    max_train_rows: int = field(0, help="Use at most this many training rows (0: all).")
    checkpoint_every: int = field(200, help="Optimizer steps between checkpoints (and at every epoch end).")
    seed: int = field(0, help="Seed of fakes, initialisation and batch order.")

    def __post_init__(self):
        distributed.accumulation(self.batch_size, self.micro_batch_size)  # refused before the stage starts
        # Defaults that depend on freezing are resolved here, so the manifest records the values used.
        if self.epochs is None:
            self.epochs = 8 if self.freeze_backbone else 3
        if self.learning_rate is None:
            self.learning_rate = 2e-2 if self.freeze_backbone else 3e-4
        if min(self.fake_random, self.fake_same_query, self.fake_shifted) < 0 or \
                self.fake_random + self.fake_same_query + self.fake_shifted <= 0:
            raise ValueError("fake_random, fake_same_query, fake_shifted must be >= 0 and not all 0")
        if self.fake_per_real <= 0:
            raise ValueError(f"fake_per_real must be > 0, got {self.fake_per_real}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        body_learning(self.freeze_backbone, self.train_top_layers)
        if self.form not in ("factorized", "joint"):
            raise ValueError(f"form must be factorized or joint, got {self.form!r}")



def run(config: DiscriminatorConfig, stage: rundir.StageRun) -> dict:
    started = time.perf_counter()
    run_dir = stage.dir.parent
    seed_everything(config.seed)
    data, spec, template = load_prepared(run_dir, stage, min_validation=2)
    train = data["train"]
    if config.max_train_rows and len(train) > config.max_train_rows:
        train = train.select(range(config.max_train_rows))
    validation = data["validation"]
    rng = np.random.default_rng(config.seed)
    weights = (config.fake_random, config.fake_same_query, config.fake_shifted)
    n_fake = int(round(len(train) * config.fake_per_real))
    fake_rows, fake_texts, fake_kinds = make_fakes(train, rng, n_fake, weights, spec, template)
    queries, responses, behaviors = train["query"], train["response"], train["behavior_text"]
    rows = list(range(len(train))) + fake_rows
    triplet_behaviors = list(behaviors) + fake_texts
    labels = torch.tensor([1.0] * len(train) + [0.0] * len(fake_rows))

    # Validation: real rows against each strategy's fakes (one per real row).
    val_sets = {}
    val_queries, val_responses = validation["query"], validation["response"]
    for name, w in (("random", (1, 0, 0)), ("same_query", (0, 1, 0)), ("shifted", (0, 0, 1))):
        val_rows, fakes, kinds = make_fakes(validation, np.random.default_rng([config.seed, 7]), len(validation), w,
                                            spec, template)
        val_sets[name] = ([val_queries[i] for i in val_rows], [val_responses[i] for i in val_rows], fakes)

    notes: list[str] = []
    factorized = config.form == "factorized"
    heads = {m: spec.levels(m) for m in METRICS}
    model, tokenizer = judge_backbone(config.backbone, run_dir, stage, sum(heads.values()) if factorized else 1,
                                      train, notes)
    extra = factorized_tables(train, spec, template) if factorized else {"form": "joint"}
    extra |= body_learning(config.freeze_backbone, config.train_top_layers)
    meta = JudgeMeta(kind="discriminator", max_length=config.max_length, with_behavior=True,
                     heads=heads if factorized else {}, extra=extra)
    judge = Judge(model, tokenizer, meta)
    discriminator = Discriminator(judge)
    smooth = config.label_smoothing
    if factorized:
        # The behaviour enters through its bins, not the text: the judge reads (query, response) only.
        texts = [judge_text(queries[i], responses[i]) for i in rows]
        extra_targets = torch.cat([discriminator.levels(triplet_behaviors).float(),
                                   discriminator.marginals(triplet_behaviors)[:, None]], dim=1)
        targets = torch.cat([labels[:, None], extra_targets], dim=1)
    else:
        texts = [judge_text(queries[i], responses[i], b) for i, b in zip(rows, triplet_behaviors)]
        targets = labels

    def loss_fn(raw, target):
        if not factorized:
            return discriminator.loss_from_raw(raw, target, None, None, smooth)[0]
        return discriminator.loss_from_raw(raw, target[:, 0], target[:, 1:5].long(), target[:, 5], smooth,
                                           config.likelihood_weight)[0]

    def evaluate() -> dict:
        real = discriminator.probability(val_queries, val_responses, validation["behavior_text"]).numpy()
        out = {"score_real": float(real.mean()), "accuracy_real": float((real > 0.5).mean())}
        for name, (fq, fr, fb) in val_sets.items():
            fake = discriminator.probability(fq, fr, fb).numpy()
            key = "auc" if name == "random" else f"auc_{name}"
            out[key] = auc(real, fake)
            if name == "random":
                out["score_fake"] = float(fake.mean())
                out["accuracy"] = float(((real > 0.5).sum() + (fake <= 0.5).sum()) / (len(real) + len(fake)))
        return out

    settings = LoopSettings(config.epochs, config.batch_size, config.learning_rate, config.weight_decay,
                            config.warmup_fraction, 1.0, config.seed, config.checkpoint_every,
                            micro_batch_size=config.micro_batch_size)
    fingerprint = hashlib.sha256(json.dumps([config_to_dict(config), stage.manifest["upstream"]],
                                            sort_keys=True).encode()).hexdigest()
    before = {k: v.detach().clone() for k, v in [(k, v) for k, v in model.named_parameters() if v.requires_grad][:4]}
    final = train_judge(judge, texts, targets, loss_fn, settings, stage, evaluate, fingerprint)
    judge.save(stage.dir / "model")
    changed = any(not torch.equal(before[k], model.get_parameter(k)) for k in before)

    ceiling = None
    simulated = run_dir / "simulate-logs" / "summary.json"
    if simulated.exists():
        ceiling = rundir.read_json(simulated).get("bayes_ceiling_auc")
    summary = {
        "val_auc": round(final["auc"], 4),
        "val_auc_same_query": round(final["auc_same_query"], 4),
        "val_auc_shifted": round(final["auc_shifted"], 4),
        "val_accuracy": round(final["accuracy"], 4),
        "val_score_real": round(final["score_real"], 4),
        "val_score_fake": round(final["score_fake"], 4),
        "bayes_ceiling_auc": ceiling,
        "gap_to_ceiling": round(ceiling - final["auc"], 4) if ceiling is not None else None,
        "train_real": len(train),
        "train_fake": len(fake_rows),
        "fake_strategies": {k: fake_kinds.count(k) for k in ("random", "same_query", "shifted")},
        "backbone": config.backbone,
        "frozen_backbone": config.freeze_backbone,
        "trained_top_layers": config.train_top_layers,
        "form": config.form,
        "parameters": param_count(model),
        "parameters_trained": param_count(model, trainable_only=True),
        "parameters_changed": changed,
        "notes": notes,
        **distributed.processes_summary(model.state_dict()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return summary
