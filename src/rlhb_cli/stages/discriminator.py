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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rlhb_cli import distributed, rundir
from rlhb_cli.behaviors.binning import METRICS, BinSpec
from rlhb_cli.behaviors.text import BehaviorTemplate
from rlhb_cli.config import config_to_dict, field
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.judge import Judge, JudgeMeta, body_learning
from rlhb_cli.prompts import judge_text
from rlhb_cli.stages.common import judge_backbone, load_prepared, param_count, seed_everything
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


class Discriminator:
    """D(query, response, behaviour text) = probability that the triplet is a real logged one.

    `factorized`: the judge has one softmax head per metric over (query, response); the logit is
    sum_m log p(bin_m | query, response) - log p(behaviour pattern), the likelihood ratio that the
    Bayes-optimal discriminator thresholds. `joint`: the judge reads the behaviour text too and emits
    one logit.
    """

    def __init__(self, judge: Judge):
        self.judge = judge
        self.form = judge.meta.extra.get("form", "joint")
        if self.form == "factorized":
            self.levels_of_text = judge.meta.extra["levels_of_text"]
            self.log_marginal = judge.meta.extra["log_marginal"]  # text -> log p(behaviour) in training rows
            self.log_marginal_unseen = judge.meta.extra["log_marginal_unseen"]

    @classmethod
    def load(cls, path: Path) -> "Discriminator":
        return cls(Judge.load(path))

    def levels(self, behavior_texts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([[self.levels_of_text[b][m] for m in METRICS] for b in behavior_texts])
        except KeyError as exc:
            raise RlhbError(f"the discriminator knows no behaviour text {exc.args[0]!r}: it renders behaviour with "
                            f"the bins and template of the run's prepare-behaviors") from None

    def logits_from(self, head_logits: torch.Tensor, levels: torch.Tensor, log_marginal: torch.Tensor,
                    metrics: tuple[str, ...] | None = None) -> torch.Tensor:
        """sum over metrics of log p(level | query, response) - log p(behaviour); with `metrics`, the sum over
        those alone and no marginal (a part of the logit, for a reward that leaves some metrics out)."""
        total, start = 0.0, 0
        for m, metric in enumerate(METRICS):
            size = self.judge.meta.heads[metric]
            if metrics is None or metric in metrics:
                log_p = torch.log_softmax(head_logits[:, start:start + size], dim=-1)
                total = total + log_p.gather(1, levels[:, m:m + 1]).squeeze(1)
            start += size
        return total - log_marginal if metrics is None else total

    def marginals(self, behavior_texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.log_marginal.get(b, self.log_marginal_unseen) for b in behavior_texts])

    def texts(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None) -> list[str]:
        """What the judge reads: the behaviour enters the text only in the joint form with behaviour."""
        if self.form == "factorized" or not self.judge.meta.with_behavior:
            return [judge_text(q, r) for q, r in zip(queries, responses)]
        return [judge_text(q, r, b) for q, r, b in zip(queries, responses, behavior_texts)]

    def logits(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None) -> torch.Tensor:
        raw = self.judge.logits(self.texts(queries, responses, behavior_texts))
        if self.form == "factorized":
            return self.logits_from(raw, self.levels(behavior_texts), self.marginals(behavior_texts))
        return raw.squeeze(-1)

    def loss_from_raw(self, raw: torch.Tensor, labels: torch.Tensor, levels: torch.Tensor | None,
                      log_marginal: torch.Tensor | None, label_smoothing: float = 0.0,
                      likelihood_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logit) from the judge's raw output: real/fake cross-entropy, plus in the factorized
        form the per-metric likelihood of the real rows' bins (it keeps the heads calibrated)."""
        smooth_labels = labels * (1 - 2 * label_smoothing) + label_smoothing
        if self.form != "factorized":
            logit = raw.squeeze(-1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, smooth_labels), logit
        logit = self.logits_from(raw, levels, log_marginal)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, smooth_labels)
        real = labels > 0.5
        if likelihood_weight and real.any():
            start, likelihood = 0, 0.0
            for m, metric in enumerate(METRICS):
                size = self.judge.meta.heads[metric]
                likelihood = likelihood + torch.nn.functional.cross_entropy(raw[real, start:start + size],
                                                                            levels[real, m])
                start += size
            loss = loss + likelihood_weight * likelihood
        return loss, logit

    def training_loss(self, queries: list[str], responses: list[str], behavior_texts: list[str] | None,
                      labels: torch.Tensor, label_smoothing: float = 0.0,
                      likelihood_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logit) of a batch of labelled triplets, with gradients (the caller sets train mode).

        A text the judge reads more than once in the batch (factorized: a (query, response) with its real
        behaviour and replaced ones) goes through it once."""
        texts = self.texts(queries, responses, behavior_texts)
        unique = list(dict.fromkeys(texts))
        raw = self.judge.forward_logits(self.judge.encode(unique))
        if len(unique) < len(texts):
            position = {t: i for i, t in enumerate(unique)}
            raw = raw[torch.tensor([position[t] for t in texts])]
        if self.form == "factorized":
            return self.loss_from_raw(raw, labels, self.levels(behavior_texts), self.marginals(behavior_texts),
                                      label_smoothing, likelihood_weight)
        return self.loss_from_raw(raw, labels, None, None, label_smoothing)

    def probability(self, queries: list[str], responses: list[str], behavior_texts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.logits(queries, responses, behavior_texts))


def factorized_tables(train, spec: BinSpec, template: BehaviorTemplate) -> dict:
    """Every behaviour text the bins can make -> its levels, and log p(text) among training rows (add-one)."""
    import itertools
    levels_of_text = {}
    for combo in itertools.product(*(range(spec.levels(m)) for m in METRICS)):
        levels = dict(zip(METRICS, combo))
        levels_of_text[template.render(spec, levels)] = levels
    counts = defaultdict(int)
    for text in train["behavior_text"]:
        counts[text] += 1
    total = len(train["behavior_text"]) + len(levels_of_text)
    log_marginal = {text: float(np.log((counts[text] + 1) / total)) for text in levels_of_text}
    return {"form": "factorized", "levels_of_text": levels_of_text, "log_marginal": log_marginal,
            "log_marginal_unseen": float(np.log(1 / total))}


def shifted_text(rng: np.random.Generator, bins: dict[str, int], spec: BinSpec, template: BehaviorTemplate) -> str | None:
    """The row's pattern with likes and dislikes (and maybe another metric) pushed away from the truth."""
    levels = dict(bins)
    for metric in ("likes", "dislikes") + ((METRICS[rng.integers(2)],) if rng.random() < 0.5 else ()):
        top = spec.levels(metric) - 1
        if top == 0:
            continue
        step = int(rng.integers(1, 3))
        levels[metric] = levels[metric] - step if levels[metric] * 2 > top else levels[metric] + step
        levels[metric] = int(np.clip(levels[metric], 0, top))
    if levels == bins:
        return None
    return template.render(spec, levels)


class FakeMaker:
    """Behaviour-replaced fakes of a split's rows; its indexes are built once (the RL loop draws every round)."""

    def __init__(self, split, spec: BinSpec, template: BehaviorTemplate):
        self.texts = list(split["behavior_text"])
        self.queries = list(split["query"])
        self.by_query = defaultdict(list)
        for i, q in enumerate(self.queries):
            self.by_query[q].append(i)
        columns = {m: list(split[f"{m}_bin"]) for m in METRICS}
        self.bins = [{m: columns[m][i] for m in METRICS} for i in range(len(self.texts))]
        self.spec, self.template = spec, template
        if len(set(self.texts)) < 2:
            raise RlhbError("every row has the same behaviour text: there is nothing to tell real from fake")

    def make(self, rng: np.random.Generator, count: int, weights: tuple[float, float, float],
             candidates=None) -> tuple[list[int], list[str], list[str]]:
        """(row index, fake behaviour text, strategy) for `count` fakes of rows drawn from `candidates` (default:
        every row); never the row's own behaviour."""
        texts, queries = self.texts, self.queries
        probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        rows, fakes, kinds = [], [], []
        attempts = 0
        while len(rows) < count and attempts < count * 20:
            attempts += 1
            i = int(rng.integers(len(texts))) if candidates is None else int(candidates[rng.integers(len(candidates))])
            kind = ("random", "same_query", "shifted")[rng.choice(3, p=probabilities)]
            fake = None
            if kind == "same_query":
                others = [j for j in self.by_query[queries[i]] if texts[j] != texts[i]]
                fake = texts[others[rng.integers(len(others))]] if others else None
            elif kind == "shifted":
                fake = shifted_text(rng, self.bins[i], self.spec, self.template)
            if fake is None:  # random, or a strategy that had nothing to offer for this row
                kind = "random"
                fake = texts[int(rng.integers(len(texts)))]
            if fake == texts[i]:
                continue
            rows.append(i)
            fakes.append(fake)
            kinds.append(kind)
        return rows, fakes, kinds


def make_fakes(split, rng: np.random.Generator, count: int, weights: tuple[float, float, float], spec: BinSpec,
               template: BehaviorTemplate) -> tuple[list[int], list[str], list[str]]:
    """(row index, fake behaviour text, strategy) for `count` fakes of random rows of the split."""
    return FakeMaker(split, spec, template).make(rng, count, weights)


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
