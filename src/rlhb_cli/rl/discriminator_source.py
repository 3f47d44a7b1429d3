"""RLHB's reward source (and RLGAF's): the discriminator's judgement that a triplet is a real logged one,
and how the discriminator learns and is watched while the policy learns against it."""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from rlhb_cli.behaviors.binning import METRICS
from rlhb_cli.models.discriminator import Discriminator, FakeMaker
from rlhb_cli.models.judge import learning_weights, load_learning_weights
from rlhb_cli.prompts import judge_text, users_side
from rlhb_cli.rl.sources import GeneratedBatch
from rlhb_cli.rundir import tail_mean


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
    collapse_threshold: float = 0.95  # generated text judged real above this ...
    collapse_iterations: int = 5  # ... for this many iterations in a row: collapsed


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

    def __init__(self, discriminator: Discriminator, settings: AdversarialSettings, train, spec=None, template=None,
                 real_rows: np.ndarray | None = None):
        self.discriminator = discriminator
        self.settings = settings
        self.with_behavior = discriminator.judge.meta.with_behavior
        self.name = "discriminator" if self.with_behavior else "discriminator-no-behavior"
        columns = ["query", "response", "behavior_text"] + [f"{m}_bin" for m in METRICS]
        self.train = {c: list(train[c]) for c in columns}  # plain lists: a data set column read is a copy
        self.queries, self.responses = self.train["query"], self.train["response"]
        self.behaviors = self.train["behavior_text"]
        self.real_rows = np.arange(len(self.queries)) if real_rows is None else real_rows
        self.spec, self.template = spec, template
        self._fakes = None  # built at the first update that needs behaviour-replaced negatives
        self.rng = np.random.default_rng([settings.seed, 11])
        self.updates = 0
        self.collapse = CollapseWatch(settings.collapse_threshold, settings.collapse_iterations)
        self.optimizer = torch.optim.AdamW([p for p in discriminator.judge.model.parameters() if p.requires_grad],
                                           lr=settings.learning_rate, weight_decay=0.0)
        self._contrast_cache: dict[str, list[str]] = {}
        if settings.reward_form == "contrast":
            self._behaviors_of_query: dict[str, list[str]] = {}
            self._behaviors_of_users: dict[str, list[str]] = {}  # a conversation with the policy's own replies
            for q, b in zip(self.queries, self.behaviors):
                for logged in (self._behaviors_of_query.setdefault(q, []),
                               self._behaviors_of_users.setdefault(users_side(q), [])):
                    if b not in logged:
                        logged.append(b)
            self._all_behaviors = sorted(set(self.behaviors))

    # ---------------------------------------------------------------------------------------- reward
    def contrast_set(self, query: str, target: str) -> list[str]:
        """K behaviour texts to contrast with: those logged for the query, topped up from all logged ones;
        fixed per (query, target), so the reward of a response does not depend on a draw."""
        key = f"{target}\x00{query}"
        if key not in self._contrast_cache:
            k = self.settings.contrast_behaviors
            logged = self._behaviors_of_query.get(query) or self._behaviors_of_users.get(users_side(query), [])
            own = [b for b in logged if b != target][:k]
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
        return {"model": learning_weights(self.discriminator.judge.model), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "updates": self.updates, "collapse": self.collapse.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_learning_weights(self.discriminator.judge.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.updates = state["updates"]
        self.collapse.load_state_dict(state["collapse"])

    def frozen_copy(self) -> "DiscriminatorSource":
        """The discriminator as it is now, for a probe whose yardstick must not move."""
        clone = copy.copy(self)
        clone.discriminator = copy.deepcopy(self.discriminator)
        return clone

    # ---------------------------------------------------------------------------------------- health
    def watch(self, row: dict, iteration: int) -> str | None:
        return self.collapse.observe(row, iteration)

    def summary(self, rows: list[dict]) -> dict:
        return {"disc_score_real_final": tail_mean(rows, "disc/score_real"),
                "disc_score_fake_final": tail_mean(rows, "disc/score_fake"),
                "disc_collapsed": self.collapse.collapsed_at is not None,
                "disc_collapsed_at": self.collapse.collapsed_at}


class CollapseWatch:
    """The paper's failure mode: generated text judged real (score near 1) iteration after iteration."""

    def __init__(self, threshold: float, iterations: int):
        self.threshold, self.iterations = threshold, iterations
        self.run = 0
        self.collapsed_at: int | None = None

    def observe(self, row: dict, iteration: int) -> str | None:
        """Mark `row` with disc/collapsed; the warning once, at the iteration the collapse is declared."""
        score = row.get("disc/score_fake", row.get("disc/score_generated"))  # a frozen one has no update logs
        if score is None or not math.isfinite(score):
            return None
        self.run = self.run + 1 if score > self.threshold else 0
        warning = None
        if self.run >= self.iterations and self.collapsed_at is None:
            self.collapsed_at = iteration
            warning = (f"discriminator collapsed: fake score above {self.threshold} for {self.run} iterations "
                       f"(since iteration {iteration - self.run + 1})")
        row["disc/collapsed"] = float(self.collapsed_at is not None)
        return warning

    def state_dict(self) -> tuple[int, int | None]:
        return self.run, self.collapsed_at

    def load_state_dict(self, state) -> None:
        self.run, self.collapsed_at = state
