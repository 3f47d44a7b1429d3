"""`rlhb simulate-conversations`: simulated users who each play a persona over a multi-turn conversation,
react to every reply with behaviour drawn from their own utility and now and then say something that
follows from their taste ("a bit long for me") without ever naming it; ALOE's preference tree over the
same conversations (arXiv 2410.03642, section 3).

Per turn the platform has two replies to the user's message: one chosen for this persona (the best of the
query's candidate answers by the persona's gold utility: what a model that inferred the persona would say)
and one chosen for the average user (the best by the population's utility: a model that did not). The
persona's gold prefers one (a tie is counted, not a pair); the conversation continues from one of the two
at random, the user reacting to it, and the other is kept as the road not taken. The user's next message
follows from the reply: a wrong or missing answer is asked again in other words, anything else moves on to
a new query, and a remark, when one is made, opens the next message.

Writes `personas.jsonl` (the hidden profiles with their descriptions: read by evaluation only, like
simulate-logs' environment.json), `conversations.jsonl` (per turn the user's message, the reply shown and
the behaviour it drew), `conversation_logs.jsonl` (the same turns as behaviour logs, the conversation so far
as the query: what `prepare-behaviors --from-stage simulate-conversations` reads for RLHB over
conversations) and `preference_tree.jsonl` (per turn the conversation so far, the chosen and the rejected
reply, which one was continued).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError
from rlhb_cli.prompts import conversation_query, users_side
from rlhb_cli.rundir import StageRun
from rlhb_cli.simulator.attributes import FEATURES, Lexicon, QueryKey, feature_matrix
from rlhb_cli.simulator.gold import UserModel
from rlhb_cli.simulator.personas import Profile, sample_personas
from rlhb_cli.simulator.world import Query, all_queries, candidate_pool, choose_queries
from rlhb_cli.storage import atomic_write_jsonl

STAGE = "simulate-conversations"
# What a user says when a reply goes against its taste: (feature, present in the reply?, the sign of the
# persona's weight that makes it a complaint, phrasings). None of them names a persona or its description.
REMARKS = (
    ("wrong", True, -1, ("I don't think that's right.", "Hmm, that's not what I found.")),
    ("missing", True, -1, ("That doesn't really answer my question.", "You didn't answer what I asked.")),
    ("rude", True, -1, ("There's no need to be rude.", "That was a bit rude.")),
    ("verbose", True, -1, ("That's a bit long for me.", "Shorter next time, please.")),
    ("verbose", False, 1, ("Could you go into a bit more detail?", "Can you say more?")),
    ("polite", True, -1, ("No need to be so formal.", "You can skip the pleasantries.")),
    ("polite", False, 1, ("A friendlier tone would be nice.", "That felt a bit curt.")),
    ("source", False, 1, ("Where is that from?", "Do you have a source for that?")),
    ("hedging", True, -1, ("Just tell me straight.", "Less hedging, please.")),
    ("hedging", False, 1, ("How sure can you be about that?", "Is that certain?")),
)


@dataclass
class ConversationsConfig:
    seed: int = field(0, help="Seed of the personas, the world and every draw.")
    personas: int = field(1000, help="Personas (preference profiles) sampled.")
    eval_personas: int = field(100, help="Of them, held out for the personalisation suite (no conversation here).")
    min_distance: float = field(0.35, help="Diversity rule: a persona's style weights lie at least this far "
                                           "(Euclidean) from every persona kept before it.")
    conversations: int = field(3000, help="Conversations simulated, each with a training persona drawn at random.")
    turns: int = field(5, help="Turns per conversation (ALOE: 10).")
    remark_rate: float = field(0.5, help="Chance that a user remarks on a reply that goes against its taste.")
    queries: int = field(300, help="Queries of the simulated world the users ask.")
    candidates: int = field(8, help="Candidate answers per query the two replies are chosen from.")

    def __post_init__(self):
        if self.personas < 2 or self.conversations < 1 or self.candidates < 2:
            raise ValueError("personas must be >= 2, conversations >= 1 and candidates >= 2")
        if not 1 <= self.turns <= 10:
            raise ValueError(f"turns must be between 1 and 10, got {self.turns}")
        if not 0.0 <= self.remark_rate <= 1.0:
            raise ValueError(f"remark_rate must be in [0, 1], got {self.remark_rate}")
        if self.min_distance < 0:
            raise ValueError("min_distance must be >= 0")


class World:
    """The queries users ask, their candidate answers with the features the gold reads, and the lexicon."""

    def __init__(self, rng: np.random.Generator, queries: int, candidates: int):
        self.queries, _ = choose_queries(rng, queries, 0)
        self.pools = {q.text: [c.text for c in candidate_pool(rng, q, candidates)] for q in self.queries}
        self.lexicon = Lexicon()
        seen, held = all_queries()
        for q in seen + held:
            for text in (q.text, q.answer_sentence, *q.wrong_sentences):
                self.lexicon.add(text)
        for texts in self.pools.values():
            for text in texts:
                self.lexicon.add(text)
        self.by_item: dict[str, list[Query]] = {}
        for q in self.queries:
            self.by_item.setdefault(q.item, []).append(q)
        self._features: dict[tuple[str, str], np.ndarray] = {}
        population = UserModel.default()
        self.population_best = {q.text: self.pools[q.text][int(np.argmax(
            population.utilities(self.features(q, self.pools[q.text]), [q.intent] * len(self.pools[q.text]))
            @ population.shares()))] for q in self.queries}

    def features(self, query: Query, texts: list[str]) -> np.ndarray:
        """(texts, FEATURES) 0/1 as the gold judge reads them, cached per (query, text)."""
        missing = [t for t in texts if (query.text, t) not in self._features]
        if missing:
            key = QueryKey(query.intent, query.required, query.rivals)
            for text, row in zip(missing, feature_matrix([key] * len(missing), missing, self.lexicon)):
                self._features[(query.text, text)] = row
        return np.array([self._features[(query.text, t)] for t in texts])

    def utility(self, persona: UserModel, query: Query, texts: list[str]) -> np.ndarray:
        return persona.utilities(self.features(query, texts), [query.intent] * len(texts))[:, 0]

    def scale(self, persona: UserModel, query: Query, utility: float) -> float:
        """The persona's gold utility on a 0-100 scale: 0 the worst of the query's candidate answers for this
        persona, 100 the best (clipped: a policy's own answer can fall outside)."""
        pool = self.utility(persona, query, self.pools[query.text])
        low, high = float(pool.min()), float(pool.max())
        if high <= low:
            return 100.0 if utility >= high else 0.0
        return float(np.clip(100.0 * (utility - low) / (high - low), 0.0, 100.0))

    def persona_best(self, persona: UserModel, query: Query) -> str:
        pool = self.pools[query.text]
        return pool[int(np.argmax(self.utility(persona, query, pool)))]

    def next_query(self, rng: np.random.Generator, query: Query, reply_features: np.ndarray) -> tuple[Query, bool]:
        """(the user's next query, whether it asks the last one again): a wrong or missing answer is asked
        again in other words (the same query when it has no other); anything else moves on to a query drawn
        at random."""
        if reply_features[FEATURES.index("wrong")] or reply_features[FEATURES.index("missing")]:
            others = [q for q in self.by_item[query.item] if q.text != query.text]
            return (others[rng.integers(len(others))] if others else query), True
        return self.queries[rng.integers(len(self.queries))], False


def react(rng: np.random.Generator, persona: UserModel, features: np.ndarray, intent: str) -> dict[str, int]:
    """One user's behaviour on one reply: viewed, then clicked and liked / disliked / neither, each drawn from
    the probabilities its utility gives (gold.UserModel.probabilities)."""
    p = {k: float(v[0, 0]) for k, v in persona.probabilities(features[None, :], [intent]).items()}
    view = rng.random() < p["view"]
    click = view and rng.random() < p["click"]
    reaction = rng.random()
    like = view and reaction < p["like"]
    dislike = view and not like and reaction < p["like"] + p["dislike"]
    return {"view": int(view), "click": int(click), "like": int(like), "dislike": int(dislike)}


def remark(rng: np.random.Generator, weights: dict[str, float], features: np.ndarray) -> str:
    """What the user says about a reply that goes against its taste: the complaint whose feature costs it most
    (its weight), phrased one of two ways; "" when nothing in the reply bothers it."""
    worst, cost = None, 0.3  # a weight under 0.3 in size is no reason to say anything
    for feature, present, sign, phrasings in REMARKS:
        weight = weights[feature]
        if bool(features[FEATURES.index(feature)]) == present and weight * sign > 0 and abs(weight) > cost:
            worst, cost = phrasings, abs(weight)
    return "" if worst is None else worst[rng.integers(len(worst))]


class Dialogue:
    """One user's conversation in progress: what it says next, and how it takes each reply. The data
    simulation and the interactive evaluation both move a conversation forward through `answer`."""

    def __init__(self, rng: np.random.Generator, world: World, profile: Profile, remark_rate: float,
                 opening: Query | None = None):
        self.rng, self.world, self.profile, self.remark_rate = rng, world, profile, remark_rate
        self.persona = profile.user_model()
        self.query = opening or world.queries[rng.integers(len(world.queries))]
        self.again, self.opening = False, ""
        self.messages: list[dict] = []
        self.turns: list[dict] = []

    def user_message(self) -> str:
        return f"{self.opening} {self.query.text}".strip()

    def so_far(self) -> list[dict]:
        """The conversation a reply answers: every turn before, the user's message last."""
        return self.messages + [{"role": "user", "content": self.user_message()}]

    def scale(self, utility: float) -> float:
        return self.world.scale(self.persona, self.query, utility)

    def answer(self, shown: str) -> dict:
        """The user reads `shown`: it reacts, may remark, and its next message follows; the turn's record."""
        features = self.world.features(self.query, [shown])[0]
        behavior = react(self.rng, self.persona, features, self.query.intent)
        said = remark(self.rng, self.profile.weights, features) if self.rng.random() < self.remark_rate else ""
        utility = float(self.world.utility(self.persona, self.query, [shown])[0])
        turn = {"turn": len(self.turns) + 1, "user": self.user_message(), "query": self.query.text,
                "asked_again": self.again, "reply": shown, **behavior, "remark": said, "utility": utility,
                "score": self.scale(utility)}
        self.turns.append(turn)
        self.messages = self.so_far() + [{"role": "assistant", "content": shown}]
        (self.query, self.again), self.opening = self.world.next_query(self.rng, self.query, features), said
        return turn


Reply = Callable[[Query, list[dict]], str]


def converse(rng: np.random.Generator, world: World, profile: Profile, turns: int, remark_rate: float,
             reply: Reply | None = None) -> tuple[list[dict], list[dict]]:
    """One conversation of `profile` over `turns` turns: (its turns, its preference-tree pairs). With `reply`
    (a policy: the query and the messages so far -> its answer) the user talks to that policy instead of
    the platform's two replies, and no pair is made."""
    dialogue = Dialogue(rng, world, profile, remark_rate)
    pairs = []
    for turn in range(1, turns + 1):
        query, before = dialogue.query, dialogue.so_far()
        if reply is None:
            aware, unaware = world.persona_best(dialogue.persona, query), world.population_best[query.text]
            utility = world.utility(dialogue.persona, query, [aware, unaware])
            shown = (aware, unaware)[rng.integers(2)]
            if aware != unaware and utility[0] != utility[1]:
                chosen, rejected = (aware, unaware) if utility[0] > utility[1] else (unaware, aware)
                pairs.append({"persona": profile.id, "turn": turn, "messages": before, "chosen": chosen,
                              "rejected": rejected, "chosen_utility": float(utility.max()),
                              "rejected_utility": float(utility.min()), "continued": "chosen"
                              if shown == chosen else "rejected"})
        else:
            shown = reply(query, before)
        dialogue.answer(shown)
    return dialogue.turns, pairs


def rebuild_world(folder: Path) -> tuple[ConversationsConfig, list[Profile], World]:
    """The personas and the world simulate-conversations made, rebuilt from its recorded config (the world is
    code and draws, not a file) and checked against the personas it wrote."""
    recorded = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["config"]
    config = ConversationsConfig(**{k: v for k, v in recorded.items() if k in ConversationsConfig.__annotations__})
    rng = np.random.default_rng(config.seed)
    profiles = sample_personas(rng, config.personas, config.eval_personas, config.min_distance)
    written = [json.loads(line) for line in (folder / "personas.jsonl").read_text(encoding="utf-8").splitlines()]
    if [p.to_json() for p in profiles] != written:
        raise RlhbError(f"{folder / 'personas.jsonl'}: this version of rlhb draws other personas from the recorded "
                        f"config; rerun simulate-conversations")
    return config, profiles, World(rng, config.queries, config.candidates)


class ConversationGold:
    """TESTBED ONLY: each logged conversation's hidden persona, for PPO on the personas' own gold (the oracle over
    conversations). A prompt (the conversation so far) is scored by the gold of the personas who sent it, on
    the 0-100 scale AL(k) uses, divided by 100: an opening question many personas asked gets their mean."""

    def __init__(self, folder: Path):
        _, profiles, self.world = rebuild_world(folder)
        personas = {p.id: p.user_model() for p in profiles}
        queries = {q.text: q for q in self.world.queries}
        self.asked: dict[str, list] = {}
        self.asked_by_users: dict[str, list] = {}  # a prompt whose earlier replies are the policy's own
        for line in (folder / "conversations.jsonl").read_text(encoding="utf-8").splitlines():
            conversation = json.loads(line)
            for row, turn in zip(behavior_rows(conversation), conversation["turns"]):
                asker = (personas[conversation["user_id"]], queries[turn["query"]])
                self.asked.setdefault(row["query"], []).append(asker)
                self.asked_by_users.setdefault(users_side(row["query"]), []).append(asker)

    def score(self, prompts: list[str], replies: list[str]) -> np.ndarray:
        out = np.empty(len(prompts))
        for i, (prompt, reply) in enumerate(zip(prompts, replies)):
            askers = self.asked.get(prompt) or self.asked_by_users.get(users_side(prompt))
            if askers is None:
                raise RlhbError(f"a prompt that no simulated conversation holds: {prompt[:80]!r}")
            out[i] = np.mean([self.world.scale(p, q, float(self.world.utility(p, q, [reply])[0])) for p, q in askers])
        return out / 100.0


def behavior_rows(conversation: dict) -> list[dict]:
    """A conversation as behaviour logs, one row per turn: the conversation so far as the query (the prompt
    builder reads it back as turns), the reply shown as the response, and what its one user did with it."""
    rows, messages = [], []
    for turn in conversation["turns"]:
        messages.append({"role": "user", "content": turn["user"]})
        rows.append({"query": conversation_query(messages), "response": turn["reply"], "pv": turn["view"],
                     "clicks": turn["click"], "likes": turn["like"], "dislikes": turn["dislike"],
                     "user_id": conversation["user_id"], "conversation": conversation["conversation"],
                     "turn": turn["turn"]})
        messages.append({"role": "assistant", "content": turn["reply"]})
    return rows


def run(config: ConversationsConfig, stage: StageRun) -> dict:
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    profiles = sample_personas(rng, config.personas, config.eval_personas, config.min_distance)
    world = World(rng, config.queries, config.candidates)
    training = [p for p in profiles if p.split == "train"]
    conversations, tree = [], []
    for number in range(config.conversations):
        profile = training[rng.integers(len(training))]
        turns, pairs = converse(rng, world, profile, config.turns, config.remark_rate)
        conversations.append({"conversation": f"conversation-{number:06d}", "user_id": profile.id, "turns": turns})
        tree += [{"conversation": f"conversation-{number:06d}"} | p for p in pairs]
    atomic_write_jsonl(stage.dir / "personas.jsonl", [p.to_json() for p in profiles])
    hidden = ("utility", "score")  # the gold's own figures: real logs have no such thing
    atomic_write_jsonl(stage.dir / "conversations.jsonl", [
        c | {"turns": [{k: v for k, v in t.items() if k not in hidden} for t in c["turns"]]} for c in conversations])
    atomic_write_jsonl(stage.dir / "preference_tree.jsonl", tree)
    atomic_write_jsonl(stage.dir / "conversation_logs.jsonl", [row for c in conversations for row in behavior_rows(c)])
    turns = [t for c in conversations for t in c["turns"]]
    return {
        "personas": len(profiles), "eval_personas": sum(p.split == "eval" for p in profiles),
        "conversations": len(conversations), "turns": len(turns),
        "pairs": len(tree), "ties": len(turns) - len(tree),
        "pairs_continued_from_chosen": sum(p["continued"] == "chosen" for p in tree),
        "remarks": sum(bool(t["remark"]) for t in turns),
        "asked_again": sum(t["asked_again"] for t in turns),
        "likes": sum(t["like"] for t in turns), "dislikes": sum(t["dislike"] for t in turns),
        "views": sum(t["view"] for t in turns), "clicks": sum(t["click"] for t in turns),
        "seconds": round(time.perf_counter() - started, 2),
    }
