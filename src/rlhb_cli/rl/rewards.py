"""Reward sources: what makes the one PPO engine RLHF, RLHBC, RLHB, RLGAF or the oracle.

A reward source scores text, never token ids, so its judge may tokenize differently from the policy:

    score(queries, responses, behaviors) -> (rewards: float tensor (n,), logs: dict of floats)

`behaviors` holds the behaviour text each response was asked for (None where the prompt had none).
A source that learns during training also has `update(rollout) -> logs`, called once per iteration
after the policy update, and `state_dict()` / `load_state_dict()` so a checkpoint holds it. A user's
own source is any object with `score`, made by a factory given as `module:callable`.
"""

from __future__ import annotations

import copy
import importlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rlhb_cli.errors import RlhbError


@runtime_checkable
class RewardSource(Protocol):
    name: str

    def score(self, queries: list[str], responses: list[str],
              behaviors: list[str | None]) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class GeneratedBatch:
    """What `update` learns from: the iteration's generated triplets and the rewards they were paid."""

    queries: list[str]
    responses: list[str]
    behaviors: list[str | None]
    rewards: torch.Tensor
    iteration: int


def load_custom(spec: str, **kwargs: Any) -> RewardSource:
    """A user's reward source from `package.module:factory`; the factory gets the run's context as keywords
    it declares (run_dir, seed)."""
    import inspect
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RlhbError(f"--reward-source {spec!r}: give it as package.module:callable")
    import os
    import sys
    if os.getcwd() not in sys.path:  # like uvicorn's --app-dir ".": a module beside the user is found
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RlhbError(f"--reward-source {spec!r}: cannot import it ({exc})") from None
    accepted = inspect.signature(factory).parameters
    source = factory(**{k: v for k, v in kwargs.items() if k in accepted})
    if not callable(getattr(source, "score", None)):
        raise RlhbError(f"--reward-source {spec!r}: made a {type(source).__name__} without a score() method")
    if not hasattr(source, "name"):
        source.name = attribute
    return source


class RewardModelSource:
    """RLHF: the Bradley-Terry reward model of train-reward, on (query, response)."""

    name = "reward-model"

    def __init__(self, path: Path):
        from rlhb_cli.models.judge import Judge
        self.judge = Judge.load(path)

    def score(self, queries, responses, behaviors):
        from rlhb_cli.prompts import judge_text
        return self.judge.logits([judge_text(q, r) for q, r in zip(queries, responses)]).squeeze(-1), {}


class ClassifierSource:
    """RLHBC: the behaviour classifier's expected behaviour, as the shaped reward or a weighted sum of heads.

    With `head_weights` {metric: w}, reward = sum_m w_m E[m] / (E[pv] + E[clicks]): the shaped reward is
    the special case likes=1, dislikes=-1.
    """

    name = "classifier"

    def __init__(self, path: Path, head_weights: dict[str, float] | None = None):
        from rlhb_cli.stages.classifier import BehaviorClassifier
        self.classifier = BehaviorClassifier.load(path)
        self.head_weights = head_weights

    def score(self, queries, responses, behaviors):
        expected = self.classifier.expected_behavior(queries, responses)
        logs = {f"reward/expected_{m}": float(np.mean(expected[m])) for m in ("pv", "clicks", "likes", "dislikes")}
        if not self.head_weights:
            return torch.as_tensor(expected["shaped_reward"], dtype=torch.float32), logs
        denominator = np.maximum(expected["pv"] + expected["clicks"], 1e-9)
        weighted = sum(w * expected[m] for m, w in self.head_weights.items()) / denominator
        return torch.as_tensor(weighted, dtype=torch.float32), logs


class OracleSource:
    """TESTBED ONLY: the simulator's hidden gold user model. The ceiling a learned reward is measured
    against; a policy trained on it is never one to ship, and real logs have no such thing."""

    name = "oracle"

    def __init__(self, environment_json: Path):
        from rlhb_cli.simulator.gold import GoldJudge
        self.gold = GoldJudge.load(environment_json)

    def score(self, queries, responses, behaviors):
        try:
            expected = self.gold.expected_behavior_batch(queries, responses)
        except KeyError as exc:
            raise RlhbError(str(exc.args[0])) from None
        return torch.as_tensor(expected["shaped_reward"], dtype=torch.float32), {}


@dataclass
class AdversarialSettings:
    reward_form: str  # probability | log_probability | contrast
    contrast_behaviors: int
    learning_rate: float
    steps: int
    batch_size: int
    frozen_iterations: int
    update_every: int
    bootstrap_ratio: float
    label_smoothing: float
    replaced_negatives: float  # behaviour-replaced real triplets per generated one, as in warm-up
    likelihood_weight: float
    seed: int
    contrast_metrics: tuple[str, ...] | None = None  # a factorized contrast over these metrics only (None: all)


class DiscriminatorSource:
    """RLHB (and RLGAF without behaviour): the discriminator's judgement that a triplet is a real logged one.

    Reward forms: `probability` D(q, r, b); `log_probability` log D; `contrast` logit D(q, r, b) minus
    the mean logit over other behaviours logged for the query — it pays for what makes the response fit
    the asked behaviour *more than* other behaviours, not for looking like any logged text (measured in
    the issue: P(real) alone gave no gain on the gold reward, contrast about 60% of the oracle's).

    Between iterations the discriminator learns: real = a fresh sample of logged triplets (plus the
    top `bootstrap_ratio` of generated ones by reward, relabelled real, the paper's bootstrapping);
    fake = the generated triplets (plus behaviour-replaced real ones).
    """

    def __init__(self, discriminator, settings: AdversarialSettings, train, spec=None, template=None,
                 real_rows: np.ndarray | None = None):
        self.discriminator = discriminator
        self.settings = settings
        self.with_behavior = discriminator.judge.meta.with_behavior
        self.name = "discriminator" if self.with_behavior else "discriminator-no-behavior"
        from rlhb_cli.behaviors.binning import METRICS
        columns = ["query", "response", "behavior_text"] + [f"{m}_bin" for m in METRICS]
        self.train = {c: list(train[c]) for c in columns}  # plain lists: a data set column read is a copy
        self.queries, self.responses = self.train["query"], self.train["response"]
        self.behaviors = self.train["behavior_text"]
        self.real_rows = np.arange(len(self.queries)) if real_rows is None else real_rows
        self.spec, self.template = spec, template
        self._fakes = None  # built at the first update that needs behaviour-replaced negatives
        self.rng = np.random.default_rng([settings.seed, 11])
        self.updates = 0
        self.optimizer = torch.optim.AdamW([p for p in discriminator.judge.model.parameters() if p.requires_grad],
                                           lr=settings.learning_rate, weight_decay=0.0)
        self._contrast_cache: dict[str, list[str]] = {}
        if settings.reward_form == "contrast":
            self._behaviors_of_query: dict[str, list[str]] = {}
            for q, b in zip(self.queries, self.behaviors):
                self._behaviors_of_query.setdefault(q, [])
                if b not in self._behaviors_of_query[q]:
                    self._behaviors_of_query[q].append(b)
            self._all_behaviors = sorted(set(self.behaviors))

    # ---------------------------------------------------------------------------------------- reward
    def contrast_set(self, query: str, target: str) -> list[str]:
        """K behaviour texts to contrast with: those logged for the query, topped up from all logged ones;
        fixed per (query, target), so the reward of a response does not depend on a draw."""
        key = f"{target}\x00{query}"
        if key not in self._contrast_cache:
            k = self.settings.contrast_behaviors
            own = [b for b in self._behaviors_of_query.get(query, []) if b != target][:k]
            rng = np.random.default_rng([self.settings.seed, zlib.crc32(key.encode())])
            pool = [b for b in self._all_behaviors if b != target and b not in own]
            extra = [pool[i] for i in rng.permutation(len(pool))[:k - len(own)]] if len(own) < k else []
            self._contrast_cache[key] = own + extra
        return self._contrast_cache[key]

    def _logits(self, queries, responses, behaviors) -> torch.Tensor:
        return self.discriminator.logits(queries, responses, behaviors if self.with_behavior else None)

    def score(self, queries, responses, behaviors):
        form = self.settings.reward_form
        factorized_contrast = form == "contrast" and self.discriminator.form == "factorized"
        if factorized_contrast:  # the heads read (q, r) once; behaviours only pick bins
            from rlhb_cli.prompts import judge_text
            raw = self.discriminator.judge.logits([judge_text(q, r) for q, r in zip(queries, responses)])
            logits = self.discriminator.logits_from(raw, self.discriminator.levels(behaviors),
                                                    self.discriminator.marginals(behaviors))
        else:
            logits = self._logits(queries, responses, behaviors)
        probability = torch.sigmoid(logits)
        logs = {"disc/score_generated": float(probability.mean())}
        if form == "probability":
            return probability, logs
        if form == "log_probability":
            return torch.nn.functional.logsigmoid(logits), logs
        sets = [self.contrast_set(q, b) for q, b in zip(queries, behaviors)]
        flat_q = [q for q, s in zip(queries, sets) for _ in s]
        flat_r = [r for r, s in zip(responses, sets) for _ in s]
        flat_b = [b for s in sets for b in s]
        if factorized_contrast:
            metrics = self.settings.contrast_metrics
            repeat = torch.tensor([len(s) for s in sets])
            others = self.discriminator.logits_from(raw.repeat_interleave(repeat, dim=0),
                                                    self.discriminator.levels(flat_b),
                                                    self.discriminator.marginals(flat_b), metrics)
            if metrics is not None:  # the asked behaviour's parts over the same metrics
                logits = self.discriminator.logits_from(raw, self.discriminator.levels(behaviors),
                                                        self.discriminator.marginals(behaviors), metrics)
        else:
            others = self._logits(flat_q, flat_r, flat_b)
        index = torch.repeat_interleave(torch.arange(len(sets)), torch.tensor([len(s) for s in sets]))
        other_mean = torch.zeros(len(sets)).index_add_(0, index, others) / torch.tensor([max(len(s), 1) for s in sets])
        logs["reward/contrast_baseline"] = float(other_mean.mean())
        return logits - other_mean, logs

    # ---------------------------------------------------------------------------------------- learning
    def should_update(self, iteration: int) -> bool:
        s = self.settings
        return s.steps > 0 and s.update_every > 0 and iteration > s.frozen_iterations and \
            (iteration - s.frozen_iterations) % s.update_every == 0

    def assemble(self, batch: GeneratedBatch):
        """The round's labelled triplets: (queries, responses, behaviours, labels, origin of each).

        Origins: real (logged), generated (fake), bootstrap (generated, among the top `bootstrap_ratio` by
        reward, relabelled real), replaced (logged with its behaviour swapped, fake).
        """
        s = self.settings
        n_generated = len(batch.responses)
        n_bootstrap = int(s.bootstrap_ratio * n_generated)
        order = torch.argsort(torch.as_tensor(batch.rewards), descending=True, stable=True)
        bootstrapped = set(order[:n_bootstrap].tolist())
        real_index = self.rng.choice(self.real_rows, size=min(len(self.real_rows), n_generated), replace=False)
        queries = [self.queries[i] for i in real_index]
        responses = [self.responses[i] for i in real_index]
        behaviors = [self.behaviors[i] for i in real_index]
        labels = [1.0] * len(real_index)
        origin = ["real"] * len(real_index)
        for i in range(n_generated):
            queries.append(batch.queries[i])
            responses.append(batch.responses[i])
            behaviors.append(batch.behaviors[i])
            labels.append(1.0 if i in bootstrapped else 0.0)
            origin.append("bootstrap" if i in bootstrapped else "generated")
        n_replaced = int(round(s.replaced_negatives * n_generated)) if self.with_behavior else 0
        if n_replaced:
            # Replaced on the round's real rows: a (query, response) read once serves its real behaviour and
            # its replaced ones (see `update`), and the pair teaches the contrast the reward is made of.
            if self._fakes is None:
                from rlhb_cli.stages.discriminator import FakeMaker
                self._fakes = FakeMaker(self.train, self.spec, self.template)
            rows, fakes, _ = self._fakes.make(self.rng, n_replaced, (0.25, 0.5, 0.25), candidates=real_index)
            queries += [self.queries[i] for i in rows]
            responses += [self.responses[i] for i in rows]
            behaviors += fakes
            labels += [0.0] * len(rows)
            origin += ["replaced"] * len(rows)
        return queries, responses, behaviors, torch.tensor(labels), np.array(origin)

    def _groups(self, queries, responses, behaviors) -> list[list[int]]:
        """The round's triplets grouped by the text the judge reads (in the order of first appearance): a
        step takes whole groups, so each text it reads serves all its triplets. Triplets of the joint form
        read their behaviour too and stand alone. The texts are tokenized here, in one call for the round."""
        texts = self.discriminator.texts(queries, responses, behaviors if self.with_behavior else None)
        self.discriminator.judge.tokenize(texts)
        members: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            members.setdefault(text, []).append(i)
        return list(members.values())

    def update(self, batch: GeneratedBatch) -> dict[str, float]:
        """One round of discriminator learning on this iteration's generated triplets; returns disc/ logs."""
        s = self.settings
        queries, responses, behaviors, label_tensor, kinds = self.assemble(batch)
        n_bootstrap = int((kinds == "bootstrap").sum())

        # The scores logged are the discriminator's judgement of each step's batch just before that step
        # learns from it: no extra scoring pass over the whole round.
        model = self.discriminator.judge.model
        model.train()
        groups = self._groups(queries, responses, behaviors)
        losses, judged, judged_kinds, judged_labels = [], [], [], []
        for _ in range(s.steps):
            pick = np.array([i for g in self.rng.permutation(len(groups)) for i in groups[g]][:s.batch_size])
            loss, logit = self.discriminator.training_loss(
                [queries[i] for i in pick], [responses[i] for i in pick],
                [behaviors[i] for i in pick] if self.with_behavior else None,
                label_tensor[torch.as_tensor(pick)], s.label_smoothing, s.likelihood_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"discriminator loss {loss.item()} in update {self.updates + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            judged.append(torch.sigmoid(logit.detach()))
            judged_kinds.append(kinds[pick])
            judged_labels.append(label_tensor[torch.as_tensor(pick)])
        model.eval()
        self.updates += 1
        logs = {"disc/bootstrapped": float(n_bootstrap), "disc/updates": float(self.updates)}
        if not losses:
            return logs
        score, kind, label = torch.cat(judged), np.concatenate(judged_kinds), torch.cat(judged_labels)
        real = score[torch.as_tensor(kind == "real")]
        generated = score[torch.as_tensor((kind == "generated") | (kind == "bootstrap"))]
        fake = score[label < 0.5]
        logs["disc/loss"] = float(np.mean(losses))
        if len(real):
            logs |= {"disc/score_real": float(real.mean()), "disc/acc_real": float((real > 0.5).float().mean())}
        if len(generated):  # every generated triplet, bootstrapped or not: the paper's collapse reads here
            logs["disc/score_fake"] = float(generated.mean())
        if len(fake):
            logs["disc/acc_fake"] = float((fake <= 0.5).float().mean())
        if (kind == "replaced").any():
            logs["disc/score_replaced"] = float(score[torch.as_tensor(kind == "replaced")].mean())
        return logs

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Its learning weights (with LoRA: the adapters and the head; the base is the warmed-up one on disk)."""
        from rlhb_cli.models.judge import learning_weights
        return {"model": learning_weights(self.discriminator.judge.model), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        from rlhb_cli.models.judge import load_learning_weights
        load_learning_weights(self.discriminator.judge.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.updates = state["updates"]

    def frozen_copy(self) -> "DiscriminatorSource":
        """The discriminator as it is now, for a probe whose yardstick must not move."""
        clone = copy.copy(self)
        clone.discriminator = copy.deepcopy(self.discriminator)
        return clone
