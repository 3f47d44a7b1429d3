"""Personas at scale for personalised alignment (ALOE, arXiv 2410.03642): preference profiles over the gold
features, each a user whose taste the policy must infer from the conversation, never from a description.

ALOE grows 3,310 personas from seed examples and keeps one only when it is unlike every kept one (a
similarity filter). Here a persona is a weight vector over the gold judge's features (attributes.FEATURES):
everyone wants a correct answer and dislikes rudeness, repetition and garbled text, by amounts that vary a
little; the style features (verbose, polite, source, hedging) vary widely, and they are what a persona is
about. The diversity rule: a drawn persona is kept only when its style weights lie at least `min_distance`
(Euclidean) from every persona kept before it. Each persona has a short English description, written from its
weights for a reader of the data; it is held with the gold and no text a policy sees contains it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rlhb_cli.simulator.attributes import FEATURES
from rlhb_cli.simulator.gold import Persona, UserModel

STYLE = ("verbose", "polite", "source", "hedging")
# The range each weight is drawn from, uniformly (utility units, as gold.UserModel's personas).
RANGES = {"correct": (1.5, 2.5), "wrong": (-2.5, -1.5), "missing": (-1.0, -0.5), "verbose": (-1.5, 1.0),
          "polite": (-0.8, 1.5), "rude": (-1.8, -0.6), "source": (-0.5, 1.8), "hedging": (-1.2, 0.8),
          "repetition": (-1.0, -0.5), "garbled": (-3.0, -3.0)}
# What a persona's style weight says about it: (feature, at least / at most, the phrase), in the order written.
TRAITS = (("verbose", 0.4, "enjoys thorough, detailed answers"), ("verbose", -0.6, "wants short, to-the-point answers"),
          ("polite", 0.7, "appreciates a warm, courteous tone"), ("polite", -0.3, "finds pleasantries unnecessary"),
          ("source", 0.8, "wants to know where information comes from"),
          ("hedging", 0.3, "likes careful, qualified statements"),
          ("hedging", -0.6, "dislikes hedging and wants direct answers"))


@dataclass
class Profile:
    """One persona: its hidden weights, the description a reader of the data sees, and its split."""

    id: str
    weights: dict[str, float]
    description: str
    split: str  # train (conversations to learn from) | eval (held out for the personalisation suite)

    def user_model(self) -> UserModel:
        """The gold user model of this one persona (the platform's behaviour constants, its own taste)."""
        base = UserModel.default()
        base.personas = [Persona(self.id, 1.0, dict(self.weights))]
        return base

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        return cls(**data)


def describe(weights: dict[str, float]) -> str:
    """A short description of a persona's taste, from its style weights."""
    traits = [phrase for feature, bound, phrase in TRAITS
              if (weights[feature] >= bound if bound > 0 else weights[feature] <= bound)]
    if not traits:
        return "A user with no strong taste in style beyond a correct answer."
    body = traits[0] if len(traits) == 1 else ", ".join(traits[:-1]) + " and " + traits[-1]
    return f"A user who {body}."


def style_vector(weights: dict[str, float]) -> np.ndarray:
    return np.array([weights[f] for f in STYLE])


def sample_personas(rng: np.random.Generator, count: int, held_out: int, min_distance: float,
                    max_draws: int = 200) -> list[Profile]:
    """`count` personas kept by the diversity rule, the last `held_out` of a seeded shuffle held out; draws
    stop after `max_draws` per persona wanted, with a clear error when the rule cannot be met."""
    if not 0 <= held_out < count:
        raise ValueError(f"held-out personas must be at least 0 and fewer than the personas ({count}), got {held_out}")
    kept: list[dict[str, float]] = []
    styles = np.empty((0, len(STYLE)))
    for _ in range(count * max_draws):
        weights = {f: float(round(rng.uniform(*RANGES[f]), 3)) for f in FEATURES}
        style = style_vector(weights)
        if len(styles) and np.sqrt(((styles - style) ** 2).sum(1)).min() < min_distance:
            continue
        kept.append(weights)
        styles = np.vstack([styles, style])
        if len(kept) == count:
            break
    else:
        raise ValueError(f"only {len(kept)} personas lie {min_distance} apart after {count * max_draws} draws; "
                         f"lower --min-distance or --personas")
    eval_ids = set(rng.permutation(count)[:held_out].tolist())
    return [Profile(f"persona-{i:05d}", w, describe(w), "eval" if i in eval_ids else "train")
            for i, w in enumerate(kept)]
