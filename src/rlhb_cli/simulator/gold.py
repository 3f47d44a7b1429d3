"""The hidden user model and the gold judge: expected behaviour of ANY response text.

The judge reads an answer's attributes from its text (attributes.py: the same rules that produced the
logs) and turns them into the users' expected behaviour through their hidden preferences.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rlhb_cli.simulator.attributes import FEATURES, Lexicon, QueryKey, detect, feature_matrix
from rlhb_cli.simulator.world import about_covered_items, all_queries

@dataclass
class Persona:
    name: str
    share: float  # of impressions
    weights: dict[str, float]  # feature -> utility weight


@dataclass
class UserModel:
    """Hidden preferences of the platform's users and how utility turns into behaviour."""

    personas: list[Persona]
    correctness_scale: dict[str, float]  # intent -> scale on correct / wrong / missing
    view: tuple[float, float] = (0.2, 0.45)  # p(view) = sigmoid(a + b u)
    click: tuple[float, float, float] = (-1.2, 0.6, 0.5)  # p(click | view) = sigmoid(a + b u + c source)
    like: tuple[float, float] = (-1.6, 0.9)  # like logit a + b u   (softmax with dislike and no reaction)
    dislike: tuple[float, float] = (-2.2, -0.9)

    @classmethod
    def default(cls) -> "UserModel":
        def w(*values):
            return dict(zip(FEATURES, values))
        #                         correct wrong missing verbose polite rude source hedging repetition garbled
        return cls(
            personas=[
                Persona("novice", 0.35, w(2.0, -1.5, -0.8, 0.3, 1.0, -1.5, 0.2, 0.0, -0.5, -3.0)),
                Persona("expert", 0.20, w(2.5, -2.5, -0.8, -1.0, 0.0, -0.6, 1.0, -0.8, -1.0, -3.0)),
                Persona("casual", 0.30, w(1.2, -0.8, -0.4, -0.8, 1.2, -1.8, -0.2, 0.2, -0.8, -3.0)),
                Persona("researcher", 0.15, w(2.0, -2.0, -0.6, 0.2, 0.2, -0.8, 1.5, -0.3, -0.6, -3.0)),
            ],
            correctness_scale={"factual": 1.0, "howto": 1.0, "chitchat": 0.5},
        )

    @classmethod
    def annotator(cls) -> "UserModel":
        """The annotators of preference pairs: a different taste (long, polite, hedged) from the users'."""
        def w(*values):
            return dict(zip(FEATURES, values))
        return cls(personas=[Persona("annotator", 1.0, w(1.5, -1.5, -1.0, 0.8, 1.5, -1.0, 0.0, 0.5, -0.3, -3.0))],
                   correctness_scale={"factual": 1.0, "howto": 1.0, "chitchat": 0.5})

    def utilities(self, features: np.ndarray, intents: list[str]) -> np.ndarray:
        """(responses, personas) utility from (responses, features) 0/1 features."""
        weights = np.array([[p.weights[f] for f in FEATURES] for p in self.personas])  # K x F
        scale = np.ones((len(intents), len(FEATURES)))
        for i, intent in enumerate(intents):
            scale[i, :3] = self.correctness_scale[intent]
        return (features * scale) @ weights.T

    def probabilities(self, features: np.ndarray, intents: list[str]) -> dict[str, np.ndarray]:
        """Per response and persona: p(view), p(click | view), p(like | view), p(dislike | view)."""
        u = self.utilities(features, intents)
        source = features[:, FEATURES.index("source")][:, None]
        sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        like_logit = self.like[0] + self.like[1] * u
        dislike_logit = self.dislike[0] + self.dislike[1] * u
        norm = 1.0 + np.exp(like_logit) + np.exp(dislike_logit)
        return {
            "view": sig(self.view[0] + self.view[1] * u),
            "click": sig(self.click[0] + self.click[1] * u + self.click[2] * source),
            "like": np.exp(like_logit) / norm,
            "dislike": np.exp(dislike_logit) / norm,
        }

    def shares(self) -> np.ndarray:
        s = np.array([p.share for p in self.personas])
        return s / s.sum()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "UserModel":
        return cls(personas=[Persona(**p) for p in data["personas"]], correctness_scale=data["correctness_scale"],
                   view=tuple(data["view"]), click=tuple(data["click"]), like=tuple(data["like"]),
                   dislike=tuple(data["dislike"]))


def expected_rates(model: UserModel, features: np.ndarray, intents: list[str]) -> dict[str, np.ndarray]:
    """Expected views, clicks, likes, dislikes per impression (persona mixture) and the shaped reward."""
    p = model.probabilities(features, intents)
    share = model.shares()
    pv = (p["view"] * share).sum(1)
    clicks = (p["view"] * p["click"] * share).sum(1)
    likes = (p["view"] * p["like"] * share).sum(1)
    dislikes = (p["view"] * p["dislike"] * share).sum(1)
    return {"pv": pv, "clicks": clicks, "likes": likes, "dislikes": dislikes,
            "shaped_reward": (likes - dislikes) / (pv + clicks)}


class GoldJudge:
    """The testbed's ground truth, loaded from environment.json: judges any response to a known query."""

    IMPRESSIONS = 1000  # expected counts are reported per this many impressions

    def __init__(self, model: UserModel, queries: dict[str, QueryKey], lexicon: Lexicon,
                 train_items: frozenset[str] = frozenset(), kept_for_evaluation: frozenset[str] = frozenset()):
        self.model = model
        self.queries = queries
        self.lexicon = lexicon
        self.train_items = train_items  # what the training queries are about
        self.kept_for_evaluation = kept_for_evaluation  # the held-out queries simulate-logs kept
        self.annotator_model: UserModel | None = None  # the annotators' taste, when the environment holds it

    @classmethod
    def load(cls, environment_json: Path) -> "GoldJudge":
        data = json.loads(Path(environment_json).read_text(encoding="utf-8"))
        queries = {q["text"]: QueryKey(q["intent"], q["required"], q["rivals"]) for q in data["queries"]}
        lexicon = Lexicon(set(data["lexicon"]["words"]), set(data["lexicon"]["bigrams"]))
        train_items = frozenset(q["item"] for q in data["queries"] if q["split"] == "train")
        kept = frozenset(q["text"] for q in data["queries"] if q["split"] == "eval")
        judge = cls(UserModel.from_json(data["user_model"]), queries, lexicon, train_items, kept)
        judge.annotator_model = UserModel.from_json(data["annotator_model"]) if "annotator_model" in data else None
        return judge

    def judged_by_annotators(self) -> "GoldJudge":
        """The same world judged by the annotators who labelled the preference pairs: another taste read from
        the same attributes, the analog of the paper's GPT-4 and human raters. It shares this judge's queries,
        so the ones `every_held_out_query` adds are known to both."""
        if self.annotator_model is None:
            raise ValueError("this environment.json holds no annotator_model")
        return GoldJudge(self.annotator_model, self.queries, self.lexicon, self.train_items, self.kept_for_evaluation)

    def every_held_out_query(self) -> list[str]:
        """Every held-out query of the simulated world about what the training queries cover, in the world's
        order, and from now on judged: simulate-logs keeps only `--eval-queries` of them (with candidate pools),
        so an evaluation on all of them measures the same thing with a narrower interval. The world is code,
        rebuilt here; a query simulate-logs kept that this world does not hold alike means other code wrote it."""
        world = {q.text: QueryKey(q.intent, q.required, q.rivals)
                 for q in about_covered_items(all_queries()[1], set(self.train_items))}
        for text in sorted(self.kept_for_evaluation):
            if world.get(text) != self.queries[text]:
                raise ValueError(f"the held-out query {text!r} is {'judged otherwise' if text in world else 'missing'}"
                                 f" in this version's simulated world: other code wrote these logs; evaluate on the "
                                 f"queries simulate-logs kept (--query-set all)")
        self.queries.update(world)
        return list(world)

    def key(self, query: str) -> QueryKey:
        try:
            return self.queries[query]
        except KeyError:
            raise KeyError(f"the gold judge knows no query {query!r}: it judges only the environment's queries") from None

    def attributes(self, query: str, response: str) -> dict[str, bool]:
        return detect(self.key(query), response, self.lexicon)

    def expected_behavior_batch(self, queries: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        keys = [self.key(q) for q in queries]
        features = feature_matrix(keys, responses, self.lexicon)
        rates = expected_rates(self.model, features, [k.intent for k in keys])
        return {k: (v if k == "shaped_reward" else v * self.IMPRESSIONS) for k, v in rates.items()}

    def expected_behavior(self, query: str, response: str) -> dict[str, float]:
        """Expected pv, clicks, likes, dislikes per 1000 impressions, and the shaped reward."""
        batch = self.expected_behavior_batch([query], [response])
        return {k: float(v[0]) for k, v in batch.items()}
