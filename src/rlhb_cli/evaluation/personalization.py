"""`rlhb evaluate-personalization`: ALOE's benchmark, interactive. Held-out personas of simulate-conversations
each open a conversation; every policy answers them turn after turn, and the simulated user reacts to the
policy's OWN replies (its next message, remark and reaction follow from them: simulator/conversations.py).

Each reply is scored by the persona's gold utility on a 0-100 scale: 0 is the worst of the query's candidate
answers for that persona, 100 the best (clipped). Per policy:
- AL(k): the mean score at turn k over the instances, with a 95% t-interval;
- IR: the least-squares slope of AL(k) over k, in points a turn, with a 95% bootstrap interval over instances;
- N-IR: the same slope after AL(1..K) is min-max normalised to [0, 1] across the turns, and N-R2 that fit's
  coefficient of determination (RLPA, arXiv 2505.15456, appendix C.3, as this project reads it: N-IR says
  whether a policy improves over the conversation whatever its level; on a flat, noisy curve it can be large
  while IR is not, so both are reported).
Every policy meets the same instances (persona, opening query, and the user's own draws), so the rows
differ by the replies alone; the reference row answers each turn with the candidate that is best for the
average user (ALOE's persona-unaware reply).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhb_cli import rundir, storage
from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError
from rlhb_cli.evaluation.evaluate import discover_policies
from rlhb_cli.models.generation import generate_responses
from rlhb_cli.models.load import load_causal_lm, policy_source
from rlhb_cli.plots import save_figure
from rlhb_cli.prompts import PromptFormat, policy_condition, policy_meta
from rlhb_cli.simulator.conversations import ConversationsConfig, Dialogue, World, rebuild_world

STAGE = "evaluate-personalization"
AVERAGE_USER = "average-user reply"


@dataclass
class PersonalizationConfig:
    policies: list[str] = field(factory=list, help="Policies to evaluate: stages of this run dir or model folders "
                                                   "(default: every done stage that left a policy/).")
    conversations: str = field("simulate-conversations", help="The stage whose held-out personas and world are used.")
    instances: int = field(100, help="Held-out (persona, opening query) instances; personas are reused in turn "
                                     "when there are fewer.")
    turns: int = field(5, help="Turns per conversation (K).")
    max_new_tokens: int = field(48, help="Tokens generated at most per reply (greedy).")
    bootstrap_samples: int = field(1000, help="Bootstrap resamples of instances for the slope's interval.")
    seed: int = field(0, help="Seed of the instances and the users' draws.")

    def __post_init__(self):
        if self.instances < 2 or not 2 <= self.turns <= 10:
            raise ValueError("instances must be >= 2 and turns between 2 and 10")


def curve_figures(scores: np.ndarray, resamples: int, seed: int) -> dict:
    """AL(k) with intervals, IR with a bootstrap interval, N-IR and N-R2 of (instances, turns) scores."""
    instances, turns = scores.shape
    al = scores.mean(0)
    half = 1.96 * scores.std(0, ddof=1) / np.sqrt(instances)
    k = np.arange(1, turns + 1)

    def slope(curve: np.ndarray) -> float:
        return float(np.polyfit(k, curve, 1)[0])
    rng = np.random.default_rng(seed)
    slopes = [slope(scores[rng.integers(instances, size=instances)].mean(0)) for _ in range(resamples)]
    spread = al.max() - al.min()
    normalised = (al - al.min()) / spread if spread > 0 else np.zeros_like(al)
    fit = np.polyval(np.polyfit(k, normalised, 1), k)
    total = ((normalised - normalised.mean()) ** 2).sum()
    return {"AL": [round(float(x), 2) for x in al],
            "AL_interval": [[round(float(a - h), 2), round(float(a + h), 2)] for a, h in zip(al, half)],
            "IR": round(slope(al), 3), "IR_interval": [round(float(x), 3) for x in np.percentile(slopes, [2.5, 97.5])],
            "N-IR": round(slope(normalised), 3),
            "N-R2": round(float(1 - ((normalised - fit) ** 2).sum() / total), 3) if total > 0 else None}


def converse_with(policy, instances: list[tuple], turns: int, seed: int, remark_rate: float, world: World,
                  max_new_tokens: int) -> list[list[dict]]:
    """Every instance's conversation with `policy` (a function from conversations so far and the users'
    persona descriptions to replies, or None for the average-user reply), all instances advancing a turn
    together. Only a policy trained told the persona (train-dpo --told-persona) reads the descriptions."""
    dialogues = [Dialogue(np.random.default_rng([seed, number]), world, profile, remark_rate, opening)
                 for number, (profile, opening) in enumerate(instances)]
    for _ in range(turns):
        if policy is None:
            replies = [world.population_best[d.query.text] for d in dialogues]
        else:
            replies = policy([d.so_far() for d in dialogues], [d.profile.description for d in dialogues],
                             max_new_tokens)
        for dialogue, reply in zip(dialogues, replies):
            dialogue.answer(reply)
    return [d.turns for d in dialogues]


def policy_replier(path: Path, notes: list[str], seed: int):
    model, tokenizer = load_causal_lm(path, notes)
    model.eval()
    meta = policy_meta(path)
    prompt = PromptFormat.of_policy(meta, tokenizer, path)
    told = meta.get("condition") == "persona"  # the upper bound: told each user's persona outright
    condition = None if told else policy_condition(meta)

    def reply(conversations: list[list[dict]], descriptions: list[str], max_new_tokens: int) -> list[str]:
        prompts = [prompt.conversation_prompt(messages, description if told else condition)
                   for messages, description in zip(conversations, descriptions)]
        return [r["response"] for r in generate_responses(model, tokenizer, prompts, max_new_tokens, greedy=True,
                                                          seed=seed)]
    return reply


def run(config: PersonalizationConfig, stage: rundir.StageRun) -> dict:
    started = time.perf_counter()
    run_dir = stage.dir.parent
    folder = rundir.require_stage(run_dir, config.conversations)
    stage.add_upstream(config.conversations)
    simulated, profiles, world = rebuild_world(folder)
    held_out = [p for p in profiles if p.split == "eval"]
    if not held_out:
        raise RlhbError(f"{folder}: no held-out personas (simulate-conversations --eval-personas 0)")
    draw = np.random.default_rng([config.seed, 1])
    instances = [(held_out[i % len(held_out)], world.queries[draw.integers(len(world.queries))])
                 for i in range(config.instances)]
    names = config.policies or discover_policies(run_dir)[0]
    if not names:
        raise RlhbError(f"{run_dir}: no policy to evaluate (train one, or give --policies)")
    notes: list[str] = []
    results, transcripts, scores_of = {}, [], {}
    for name in [AVERAGE_USER] + list(names):
        replier = None if name == AVERAGE_USER else policy_replier(
            policy_source(name, run_dir, stage, f"policy {name}"), notes, config.seed)
        conversations = converse_with(replier, instances, config.turns, config.seed, simulated.remark_rate, world,
                                      config.max_new_tokens)
        scores = scores_of[name] = np.array([[t["score"] for t in turns] for turns in conversations])
        likes = np.array([[t["like"] for t in turns] for turns in conversations]).mean(0)
        results[name] = curve_figures(scores, config.bootstrap_samples, config.seed) | {
            "likes": [round(float(x), 3) for x in likes]}
        transcripts += [{"policy": name, "instance": i, "persona": instances[i][0].id, "turns": turns}
                        for i, turns in enumerate(conversations)]
    storage.atomic_write_jsonl(stage.dir / "conversations.jsonl", transcripts)
    storage.atomic_write_json(stage.dir / "personalization.json", results)
    draw_curves(results, stage.dir / "al_curves.png")
    return {"instances": config.instances, "turns": config.turns, "held_out_personas": len(held_out),
            "policies": {name: {k: r[k] for k in ("AL", "IR", "IR_interval", "N-IR", "N-R2")}
                         | {"scores": [[round(float(x), 2) for x in row] for row in scores_of[name]]}
                         for name, r in results.items()},
            "notes": notes, "seconds": round(time.perf_counter() - started, 1)}


def draw_curves(results: dict, out: Path) -> None:
    """AL(k) of every policy with its interval band."""
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib
    matplotlib.use("Agg")
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, figures in results.items():
        k = np.arange(1, len(figures["AL"]) + 1)
        low, high = zip(*figures["AL_interval"])
        ax.plot(k, figures["AL"], marker="o", label=name, linestyle="--" if name == AVERAGE_USER else "-")
        ax.fill_between(k, low, high, alpha=0.15)
    ax.set_xlabel("turn k", fontsize=8)
    ax.set_ylabel("AL(k): the persona's score, 0-100", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, out)
