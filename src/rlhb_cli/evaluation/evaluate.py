"""`rlhb evaluate`: which policy do users like better? Held-out responses judged by every judge at hand.

Each policy answers the held-out queries with the prompt it was trained for (policy.json: its condition,
the most preferred behaviour by default, and its format), greedily and `samples` times sampled, from fixed
seeds. Judges: two golds when the logs came from simulate-logs, the platform's users (`gold`, the
testbed's ground truth) and the annotators who labelled the preference pairs (`annotators`: another
taste, the analog of the paper's GPT-4 and human raters), and the run's own reward model, behaviour
classifier and discriminator. Every mean has a bootstrap
interval over queries; Win-Tie-Loss compares each policy with the baseline query by query.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rich.console import Console
from rich.table import Table

from rlhb_cli import distributed, rundir, storage
from rlhb_cli.behaviors.binning import most_preferred_levels
from rlhb_cli.behaviors.prepare import SEALED, load_prepared
from rlhb_cli.config import field
from rlhb_cli.distributed import seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.evaluation.chat_judge import ChatJudge
from rlhb_cli.evaluation.ordering import TARGETS, judge_ordering, sealed_rows, sealed_status
from rlhb_cli.evaluation.referee import cross_fitted_referee
from rlhb_cli.evaluation.statistics import (agreement_with_gold, answer_draw_se, bootstrap_interval, by_query,
                                            distinct_2, feature_rates, gains_by_set, reward_model_competence,
                                            spearman, win_tie_loss)
from rlhb_cli.models.classifier import BehaviorClassifier
from rlhb_cli.models.discriminator import Discriminator
from rlhb_cli.models.generation import generate_responses
from rlhb_cli.models.likelihood import sequence_logprobs
from rlhb_cli.models.card import GOLD_JUDGES, write_stage_cards
from rlhb_cli.models.load import load_causal_lm, load_tokenizer, policy_source
from rlhb_cli.prompts import PromptFormat, policy_condition, policy_meta
from rlhb_cli.registry import POLICY_STAGES
from rlhb_cli.rl.sources import RewardModelSource
from rlhb_cli.simulator.gold import GoldJudge
from rlhb_cli.stats import evenly_spaced

STAGE = "evaluate"
QUERY_SETS = ("auto", "test", "environment", "sealed", "all", "every-held-out", "train")


@dataclass
class EvaluateConfig:
    policies: list[str] = field(factory=list, help="Stages (or model folders, GGUF files, smollm2) of the policies to "
                                                   "evaluate; default: every stage of the run dir that left a policy/.")
    baseline: str = field("train-sft", help="Policy the others are compared with in Win-Tie-Loss.")
    query_set: str = field("auto", help="test (prepare-behaviors' held-out split), environment (the simulator's "
                                        "held-out queries: new phrasings), sealed (the sealed world's: facts no "
                                        "log row is about), all, auto (all when simulated), "
                                        "every-held-out (test and every new phrasing the world holds "
                                        "about what the training queries cover, not only those simulate-logs "
                                        "kept: about twice the queries, narrower intervals), or train (the "
                                        "training split's queries, those RL was prompted with: what a policy "
                                        "learned there against what carried over to new queries).")
    max_queries: int = field(0, help="Evaluate on at most this many of the chosen queries, a seeded draw (0: all).")
    samples: int = field(4, help="Sampled responses per query (besides the greedy one).")
    max_new_tokens: int = field(48, help="Tokens generated at most per response.")
    temperature: float = field(1.0, help="Sampling temperature.")
    packed_generation: bool = field(False, help="On a CPU: generate through oneDNN's matrix products on packed "
                                               "weights (faster; the same up to float rounding).")
    tie_margin: float = field(0.1, help="Win-Tie-Loss: a difference below this many standard deviations of the "
                                        "judge's scores is a tie.")
    bootstrap_samples: int = field(1000, help="Bootstrap resamples of queries for the 95% intervals.")
    seed: int = field(0, help="Seed of sampling and of the bootstrap.")
    following_queries: int = field(40, help="Behaviour following: queries on which each behaviour-conditioned "
                                            "policy is asked for every level of likes and of dislikes (0: skip).")
    perplexity_rows: int = field(0, help="Logged test responses each policy's perplexity is measured on, spread over "
                                         "the split (0: all of them; a pretrained model's pass over 720 rows takes "
                                         "minutes on a CPU).")
    perplexity_max_tokens: int = field(128, help="Perplexity scores each logged response on at most its first this "
                                                 "many tokens, after at most its prompt's last this many (0: whole; "
                                                 "real replies run to thousands of tokens).")
    judge_url: str = field("", help="An OpenAI-compatible endpoint (e.g. https://api.openai.com/v1) whose model rates "
                                    "each greedy answer 1-10; called only when given; answers cached in "
                                    "RUN_DIR/.judge-cache.sqlite, so a rerun costs nothing.")
    judge_model: str = field("gpt-4o", help="Model name sent to --judge-url.")
    judge_key_env: str = field("RLHB_JUDGE_API_KEY", help="Environment variable holding the endpoint's API key.")
    judge_requests_per_minute: float = field(60.0, help="Rate limit of calls to --judge-url.")
    sealed_rows: int = field(4000, help="Logged answers of the sealed split (whole queries, a seeded draw; 0: all) "
                                        "that each judge orders against their users' behaviour (gold-free trust).")
    referee: bool = field(True, help="Score the policies' answers to sealed queries with a referee trained on the "
                                     "sealed logs alone (cross-fitted; evaluation/referee.py).")

    def __post_init__(self):
        if min(self.max_queries, self.perplexity_rows, self.perplexity_max_tokens, self.sealed_rows) < 0:
            raise ValueError("max_queries, perplexity_rows, perplexity_max_tokens and sealed_rows must be >= 0")
        if not set(self.query_set.split(",")) <= set(QUERY_SETS):
            raise ValueError(f"query_set takes {', '.join(QUERY_SETS)} (several joined by commas), got {self.query_set!r}")
        if self.samples < 0 or self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError("samples must be >= 0, max_new_tokens >= 1 and temperature > 0")
        if self.tie_margin < 0 or self.bootstrap_samples < 1:
            raise ValueError("tie_margin must be >= 0 and bootstrap_samples >= 1")


def discover_policies(run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(stages with a policy that is done and fresh, {stage: why it is skipped} for the others)."""
    def has_policy(stage_dir: Path) -> bool:  # full weights, or LoRA adapters over a base
        return any((stage_dir / "policy" / name).exists() for name in ("config.json", "adapter_config.json"))

    found = [s for s in POLICY_STAGES if has_policy(run_dir / s)]
    found += sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name not in found and has_policy(p))
    usable, skipped = [], {}
    for name in found:
        state, _, detail = rundir.stage_state(run_dir / name)
        if state == "done":
            usable.append(name)
        else:
            skipped[name] = f"{state}: {detail}" if detail else state
    return usable, skipped


class Judges:
    """Every judge available in the run dir, each scoring (queries, responses) -> one number per response."""

    def __init__(self, run_dir: Path, stage: rundir.StageRun, behavior_text: str, config: EvaluateConfig):
        self.scorers: dict[str, object] = {}
        self.greedy_only: set[str] = set()
        self.chat = None
        self.gold = None
        environment = run_dir / "simulate-logs" / "environment.json"
        if environment.exists():
            stage.add_upstream("simulate-logs")
            self.gold = GoldJudge.load(environment)
            self.scorers["gold"] = lambda q, r: self.gold.expected_behavior_batch(q, r)["shaped_reward"]
            annotators = self.gold.judged_by_annotators()  # the paper's raters' analog
            self.scorers["annotators"] = lambda q, r: annotators.expected_behavior_batch(q, r)["shaped_reward"]
        if rundir.stage_state(run_dir / "train-reward")[0] == "done":
            stage.add_upstream("train-reward")
            reward_model = RewardModelSource(run_dir / "train-reward" / "model")
            self.scorers["reward_model"] = lambda q, r: reward_model.score(q, r, [None] * len(q))[0].numpy()
        if rundir.stage_state(run_dir / "train-classifier")[0] == "done":
            stage.add_upstream("train-classifier")
            classifier = BehaviorClassifier.load(run_dir / "train-classifier" / "model")
            self.scorers["classifier"] = lambda q, r: classifier.expected_behavior(q, r)["shaped_reward"]
        if rundir.stage_state(run_dir / "warmup-discriminator")[0] == "done":
            stage.add_upstream("warmup-discriminator")
            discriminator = Discriminator.load(run_dir / "warmup-discriminator" / "model")
            self.scorers["discriminator"] = lambda q, r: discriminator.probability(
                q, r, [behavior_text] * len(q)).numpy()
        if config.judge_url:  # costs money per call: greedy answers only, cached
            self.chat = ChatJudge(config.judge_url, config.judge_model, run_dir / ".judge-cache.sqlite",
                                  config.judge_key_env, config.judge_requests_per_minute)
            self.scorers["chat"] = self.chat.score
            self.greedy_only.add("chat")

    def features(self, queries: list[str], responses: list[str]) -> list[list[str]] | None:
        """The gold users' attributes of each answer (correct, polite, source, ...), when simulated."""
        if self.gold is None:
            return None
        return [[f for f, present in self.gold.attributes(q, r).items() if present] for q, r in zip(queries, responses)]

    def score(self, queries: list[str], responses: list[str], greedy: bool) -> dict[str, np.ndarray]:
        return {name: np.asarray(scorer(queries, responses), dtype=np.float64) for name, scorer in self.scorers.items()
                if greedy or name not in self.greedy_only}


def _queries(config: EvaluateConfig, run_dir: Path, data, gold) -> dict[str, str]:
    """query -> the set it comes from (`query_set` may join sets with commas, e.g. every-held-out,sealed)."""
    parts = set(config.query_set.split(","))
    if "auto" in parts:
        parts = (parts - {"auto"}) | {"all" if gold is not None else "test"}
    out: dict[str, str] = {}
    if "train" in parts:
        out |= {q: "train" for q in sorted(set(data["train"]["query"]))}
    if parts & {"test", "all", "every-held-out"}:
        out |= {q: "test" for q in sorted(set(data["test"]["query"]))}
    simulated = parts & {"environment", "all", "every-held-out", "sealed"}
    if simulated and gold is None:
        raise RlhbError(f"--query-set {','.join(sorted(simulated))} needs the logs of simulate-logs (its held-out queries)")
    if simulated:
        environment = rundir.read_json(run_dir / "simulate-logs" / "environment.json")
        if parts & {"environment", "all"}:
            out |= {q["text"]: "environment" for q in environment["queries"] if q["split"] == "eval"}
        if parts & {"sealed", "all"}:  # the sealed world: facts no log row is about (simulate-logs --sealed-facts)
            out |= {q["text"]: "sealed" for q in environment["queries"] if q["split"] == "sealed"}
    if "every-held-out" in parts:  # "environment": kept by simulate-logs; "world": the rest of them
        try:
            world = gold.every_held_out_query()
        except ValueError as error:
            raise RlhbError(f"{run_dir / 'simulate-logs' / 'environment.json'}: {error}") from None
        out |= {q: "environment" if q in gold.kept_for_evaluation else "world" for q in world}
    if not out:
        raise RlhbError(f"{run_dir / 'prepare-behaviors'}: no held-out queries to evaluate on; rerun "
                        f"prepare-behaviors with --test-fraction above 0")
    if config.max_queries and len(out) > config.max_queries:
        keep = set(np.random.default_rng([config.seed, 7]).choice(len(out), config.max_queries, replace=False))
        out = {q: s for i, (q, s) in enumerate(out.items()) if i in keep}
    return out


def behavior_following(model, tokenizer, prompt: PromptFormat, queries: list[str], spec, template, judge,
                       config: EvaluateConfig) -> dict:
    """Ask for each level of likes (then of dislikes), the other metrics at their most preferred level, and
    measure how the judged rate of that metric per view tracks the level asked (Spearman over answers)."""
    out = {}
    for metric in ("likes", "dislikes"):
        asked, judged, per_level = [], [], []
        for level in range(spec.levels(metric)):
            levels = most_preferred_levels(spec) | {metric: level}
            text = template.render(spec, levels)
            answers = generate_responses(model, tokenizer, [prompt.prompt(q, text) for q in queries],
                                         config.max_new_tokens, greedy=True, seed=config.seed,
                                         packed=config.packed_generation)
            behavior = judge(queries, [a["response"] for a in answers])
            rate = behavior[metric] / np.maximum(behavior["pv"], 1e-9)
            asked += [level] * len(queries)
            judged += list(rate)
            per_level.append(round(float(rate.mean()), 5))
        out[metric] = {"spearman": round(spearman(np.array(asked, float), np.array(judged)), 4),
                       "judged_rate_per_level": per_level}
    return out


def run(config: EvaluateConfig, stage: rundir.StageRun) -> dict:
    started = time.perf_counter()
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    data, spec, template = load_prepared(run_dir, stage, sealed=True)
    best = template.most_preferred(spec)
    judges = Judges(run_dir, stage, best, config)
    query_sets = _queries(config, run_dir, data, judges.gold)
    queries = list(query_sets)
    names, skipped = (config.policies, {}) if config.policies else discover_policies(run_dir)
    if not names:
        raise RlhbError(f"{run_dir}: no policy to evaluate; run `rlhb train-sft --run-dir {run_dir}` first")
    if config.baseline not in names:
        names = [config.baseline] + names
    reference_path = policy_source(config.baseline, run_dir, stage, "baseline policy")
    reference, reference_tokenizer = load_causal_lm(reference_path, [])
    reference.eval()
    reference_format = PromptFormat.of_policy(policy_meta(reference_path), reference_tokenizer, reference_path)

    follow_judge = None  # expected behaviour of (query, response): the gold users, else the run's classifier
    if judges.gold is not None:
        follow_judge = judges.gold.expected_behavior_batch
    elif rundir.stage_state(run_dir / "train-classifier")[0] == "done":
        follow_judge = BehaviorClassifier.load(run_dir / "train-classifier" / "model").expected_behavior
    rows: list[dict] = []
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # policy -> decoding -> judge -> per-query mean
    draw_variances: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # the same: variance of that mean
    health: dict[str, dict] = {}
    test = data["test"]
    real_rows = evenly_spaced(len(test["query"]), config.perplexity_rows).tolist()  # perplexity's logged answers
    for name in names:
        path = policy_source(name, run_dir, stage, "policy")
        meta = policy_meta(path)
        condition = policy_condition(meta, best)
        if path == reference_path:  # the baseline is loaded already
            model, tokenizer = reference, reference_tokenizer
        else:
            model, tokenizer = load_causal_lm(path, [])
            model.eval()
        prompt = PromptFormat.of_policy(meta, tokenizer, path)
        prompts = [prompt.prompt(q, condition) for q in queries]
        scores[name] = {}
        sampled_texts, sampled_prompts = [], []
        for decoding, repeats in (("greedy", 1), ("sampled", config.samples)):
            if repeats == 0:
                continue
            repeated_prompts = [p for p in prompts for _ in range(repeats)]
            repeated_queries = [q for q in queries for _ in range(repeats)]
            responses = generate_responses(model, tokenizer, repeated_prompts, config.max_new_tokens,
                                           greedy=decoding == "greedy", seed=config.seed,
                                           temperature=config.temperature, packed=config.packed_generation)
            texts = [r["response"] for r in responses]
            judged = judges.score(repeated_queries, texts, greedy=decoding == "greedy")
            scores[name][decoding] = {j: v.reshape(len(queries), repeats).mean(1) for j, v in judged.items()}
            if repeats > 1:  # how far the answers' draw alone moves each query's mean
                draw_variances.setdefault(name, {})[decoding] = {
                    j: v.reshape(len(queries), repeats).var(1, ddof=1) / repeats for j, v in judged.items()}
            features = judges.features(repeated_queries, texts)
            for i, (q, r) in enumerate(zip(repeated_queries, responses)):
                rows.append({"policy": name, "decoding": decoding, "query": q, "query_set": query_sets[q],
                             "sample": i % repeats, **r, "scores": {j: float(v[i]) if np.isfinite(v[i]) else None
                                                             for j, v in judged.items()},
                             **({"gold_features": features[i]} if features else {})})
            if decoding == "sampled":
                sampled_texts, sampled_prompts = texts, repeated_prompts
            health.setdefault(name, {})[decoding] = {
                "length_tokens": float(np.mean([r["tokens"] for r in responses])),
                "eos_rate": float(np.mean([r["ended"] for r in responses])),
                "distinct_2": round(distinct_2(texts), 4)}
            if features:
                health[name][decoding]["gold_feature_rates"] = feature_rates(features)
        if sampled_texts:  # KL(policy || baseline) per response, estimated on the policy's own samples
            own, _ = sequence_logprobs(model, tokenizer, prompt, sampled_prompts, sampled_texts)
            reference_prompts = [reference_format.prompt(q, condition) for q in repeated_queries]
            ref, _ = sequence_logprobs(reference, reference_tokenizer, reference_format, reference_prompts,
                                       sampled_texts)
            health[name]["kl_to_baseline"] = round(float(np.mean(own - ref)), 4)
        if config.following_queries and condition is not None and follow_judge is not None:
            health[name]["behavior_following"] = behavior_following(
                model, tokenizer, prompt, queries[:config.following_queries], spec, template, follow_judge, config)
        real_prompts = [prompt.prompt(test["query"][i], test["behavior_text"][i]) for i in real_rows]
        real_responses = [test["response"][i] for i in real_rows]
        logprobs, tokens = sequence_logprobs(model, tokenizer, prompt, real_prompts, real_responses,
                                             config.perplexity_max_tokens)
        health[name]["perplexity_real_responses"] = round(float(np.exp(-logprobs.sum() / max(tokens.sum(), 1))), 4)

    if judges.gold is not None:
        others = [j for j in judges.scorers if j not in ("gold", *judges.greedy_only)]
        for name in names:
            sampled = [r for r in rows if r["policy"] == name and r["decoding"] == "sampled"]
            if sampled and others:
                health[name]["judge_agreement_with_gold"] = agreement_with_gold(sampled, others)
            if sampled and "reward_model" in others and "annotators" in others:
                # a reward model learns the annotators' pairs: is it competent at their taste, on these answers?
                health[name]["reward_model_agreement_with_annotators"] = reward_model_competence(sampled)
    references = {}
    if judges.gold is not None:  # what was achievable on these queries: the environment's own candidates
        pools = {q["text"]: q for q in rundir.read_json(run_dir / "simulate-logs" / "environment.json")["queries"]}
        for key in ("best_in_pool", "pool_mean"):
            values = np.array([pools[q][key] for q in queries if q in pools])
            if not len(values):
                continue
            low, high = bootstrap_interval(values, config.bootstrap_samples, config.seed)
            references[key] = {"mean": round(float(values.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}
    summary = _summarise(config, scores, health, queries, query_sets, judges, names, references, draw_variances)
    rows_of_sealed = sealed_rows(test["query"], config.sealed_rows, config.seed)  # gold-free: judges against behaviour
    sealed = test.select(rows_of_sealed)
    summary["judge_ordering"] = judge_ordering(
        sealed["query"], sealed["response"], sealed["source_line"],
        {t: sealed[t] for t in TARGETS}, {n: f for n, f in judges.scorers.items() if n not in judges.greedy_only},
        config.bootstrap_samples, config.seed) | {"gold_judges": [j for j in GOLD_JUDGES if j in judges.scorers]}
    summary["sealed"] = sealed_status(run_dir, SEALED, "evaluate")
    if config.referee:
        decoding = "sampled" if config.samples else "greedy"
        answers: dict[str, tuple[list, list]] = {n: ([], []) for n in names}  # each policy's answers to sealed queries
        for r in rows:
            if r["decoding"] == decoding and r["query_set"] == "test":
                answers[r["policy"]][0].append(r["query"])
                answers[r["policy"]][1].append(r["response"])
        summary["referee"] = cross_fitted_referee({k: sealed[k] for k in ("query", "response", "shaped_reward")}, answers,
                                                  config.baseline, config.bootstrap_samples, config.seed) | {"decoding": decoding}
    stage.write_json("summary_detail.json", summary)
    for name in names:  # the run's evaluated policies carry their figures in their model cards
        if (run_dir / name / "policy").is_dir() and distributed.is_main_process():
            write_stage_cards(run_dir / name, lambda folder: load_tokenizer(folder, []),
                              summary["scores"][name].get("sampled") or summary["scores"][name].get("greedy"))
    storage.atomic_write_text(stage.dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _print_table(Console(), summary, names)
    return {"headline": summary["headline"], "queries": len(queries),
            "query_sets": {s: list(query_sets.values()).count(s) for s in set(query_sets.values())},
            "sealed_split_unseen": summary["sealed"]["unseen"],
            "policies": names, "skipped_policies": skipped, "perplexity_rows": len(real_rows),
            "perplexity_max_tokens": config.perplexity_max_tokens, "judges": list(judges.scorers),
            **({"chat_judge": {"endpoint": judges.chat.endpoint, "model": config.judge_model, "calls": judges.chat.calls,
                               "cache_hits": judges.chat.cache_hits, "unparsed_replies": judges.chat.unparsed}}
               if judges.chat else {}), "baseline": config.baseline,
            "seconds": round(time.perf_counter() - started, 1)}


def _summarise(config, scores, health, queries, query_sets, judges, names, references, draw_variances) -> dict:
    table: dict = {}
    for name in names:
        table[name] = {}
        for decoding, by_judge in scores[name].items():
            table[name][decoding] = {}
            for judge, per_query in by_judge.items():
                low, high = bootstrap_interval(per_query, config.bootstrap_samples, config.seed)
                entry = {"mean": round(float(np.nanmean(per_query)), 4), "ci95": [round(low, 4), round(high, 4)]}
                if not np.isfinite(per_query).all():
                    entry["unrated_queries"] = int((~np.isfinite(per_query)).sum())
                if name != config.baseline and decoding in scores[config.baseline]:
                    base = scores[config.baseline][decoding][judge]
                    spread = np.nanstd(np.concatenate([scores[n][decoding][judge] for n in names
                                                       if decoding in scores[n]]))
                    entry["win_tie_loss"] = {k: round(v, 4) for k, v in
                                             win_tie_loss(per_query, base, config.tie_margin * spread).items()}
                    delta = per_query - base
                    low, high = bootstrap_interval(delta, config.bootstrap_samples, config.seed)
                    entry["gain_over_baseline"] = {"mean": round(float(np.nanmean(delta)), 4),
                                                   "ci95": [round(low, 4), round(high, 4)], "by_query": by_query(delta),
                                                   "by_set": gains_by_set(delta, [query_sets[q] for q in queries],
                                                                          config.bootstrap_samples, config.seed)}
                    variances = [draw_variances.get(n, {}).get(decoding, {}).get(judge) for n in (name, config.baseline)]
                    if all(v is not None for v in variances):
                        entry["gain_over_baseline"]["answer_draw_se"] = round(answer_draw_se(*variances), 4)
                table[name][decoding][judge] = entry
    headline_judge = "gold" if "gold" in judges.scorers else next(iter(judges.scorers), None)
    headline = {}
    if headline_judge:
        for name in names:
            headline[name] = {d: table[name][d][headline_judge]["mean"] for d in table[name]}
    return {"judge_of_headline": headline_judge, "headline": headline, "scores": table, "health": health,
            "references": references, "tie_margin_sd": config.tie_margin, "baseline": config.baseline}


def _print_table(console, summary: dict, names: list[str]) -> None:
    judge = summary["judge_of_headline"]
    if judge is None:
        return
    table = Table(title=f"evaluate: {judge} judge, mean [95% CI]; gain and W/T/L against the baseline",
                  title_justify="left")
    for column in ("policy", "greedy", "sampled", "gain (sampled)", "W/T/L (sampled)", "KL", "distinct-2"):
        table.add_column(column)
    for name in names:
        cells = [name]
        for decoding in ("greedy", "sampled"):
            entry = summary["scores"][name].get(decoding, {}).get(judge)
            cells.append(f"{entry['mean']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}]" if entry else "-")
        entry = summary["scores"][name].get("sampled", {}).get(judge, {})
        gain = entry.get("gain_over_baseline")
        draw = f" (answers' draw ±{gain['answer_draw_se']:.3f})" if gain and "answer_draw_se" in gain else ""
        cells.append(f"{gain['mean']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]{draw}" if gain else "baseline")
        wtl = entry.get("win_tie_loss")
        cells.append(f"{wtl['win']:.2f}/{wtl['tie']:.2f}/{wtl['loss']:.2f}" if wtl else "")
        health = summary["health"].get(name, {})
        cells.append(f"{health.get('kl_to_baseline', float('nan')):.2f}")
        cells.append(f"{health.get('sampled', health.get('greedy', {})).get('distinct_2', float('nan')):.3f}")
        table.add_row(*cells)
    for key, entry in summary["references"].items():
        table.add_row(f"({key.replace('_', ' ')})", "", f"{entry['mean']:+.3f} [{entry['ci95'][0]:+.3f}, "
                      f"{entry['ci95'][1]:+.3f}]", "", "", "", "")
    console.print(table)
