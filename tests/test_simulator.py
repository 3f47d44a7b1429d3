"""The simulated platform: deterministic, and its gold judge prefers what its users prefer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_jsonl
from rlhb_cli.storage import sha256_of
from rlhb_cli.simulator.attributes import Lexicon, QueryKey, detect
from rlhb_cli.simulator.gold import GoldJudge
from rlhb_cli.simulator.world import all_queries, candidate_pool


def test_same_seed_same_logs_and_other_seed_differs(cli, tmp_path, small_sim):
    args = ["--impressions", 200_000, "--queries", 120, "--eval-queries", 40]
    cli("simulate-logs", "--out", tmp_path / "again", *args)
    cli("simulate-logs", "--out", tmp_path / "other", "--seed", 1, *args)
    first = small_sim / "simulate-logs"
    for name in ("logs.jsonl", "preferences.jsonl", "environment.json"):
        assert sha256_of(first / name) == sha256_of(tmp_path / "again" / name), name
    assert sha256_of(first / "logs.jsonl") != sha256_of(tmp_path / "other" / "logs.jsonl")


def test_logs_have_the_documented_rows(small_sim):
    rows = read_jsonl(small_sim / "simulate-logs" / "logs.jsonl")
    summary = json.loads((small_sim / "simulate-logs" / "summary.json").read_text())
    assert len(rows) == summary["rows"] == 120 * 8 * 3
    assert {"query", "response", "pv", "clicks", "likes", "dislikes", "window"} <= set(rows[0])
    assert sum(r["pv"] for r in rows) == summary["views"]
    assert all(r["clicks"] <= r["pv"] and r["likes"] + r["dislikes"] <= r["pv"] for r in rows)
    assert len({r["query"] for r in rows}) == 120
    assert set(summary["intents"]) == {"factual", "howto", "chitchat"} and min(summary["intents"].values()) > 0
    pairs = read_jsonl(small_sim / "simulate-logs" / "preferences.jsonl")
    assert len(pairs) == summary["preference_pairs"] == 120 * 4
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_held_out_queries_are_new_but_about_known_things(small_sim):
    env = json.loads((small_sim / "simulate-logs" / "environment.json").read_text())
    train = {q["text"]: q for q in env["queries"] if q["split"] == "train"}
    held = [q for q in env["queries"] if q["split"] == "eval"]
    assert len(held) == 40 and not set(q["text"] for q in held) & set(train)
    covered = {part for q in train.values() for part in q["item"].split("+")}
    assert all(part in covered for q in held for part in q["item"].split("+"))


@pytest.fixture(scope="module")
def judge(small_sim) -> GoldJudge:
    return GoldJudge.load(small_sim / "simulate-logs" / "environment.json")


def _factual_query(judge: GoldJudge) -> str:
    return next(q for q, key in judge.queries.items() if q.startswith("What is the capital of ") or
                (key.intent == "factual" and "capital" in q and " and " not in q))


def test_gold_prefers_what_personas_prefer(judge):
    query = _factual_query(judge)
    key = judge.key(query)
    country = query.split(" of ")[-1].rstrip("?.")
    answer = key.required[0].title()
    correct = f"The capital of {country} is {answer}."
    score = lambda text: judge.expected_behavior(query, text)["shaped_reward"]  # noqa: E731
    wrong = f"The capital of {country} is {key.rivals[0].title()}."
    assert score(correct) > score(wrong)
    assert score(f"Happy to help. {correct} Have a nice day.") > score(f"Obviously. {correct} Do not ask again.")
    # a polite non-answer with a link must not beat the plain correct answer
    non_answer = "Thanks for asking! I do not know the answer to that. Source: https://ref.example.org/x Hope this helps."
    assert score(non_answer) < score(correct)
    assert judge.attributes(query, non_answer)["wrong"]
    # naming every capital is no way to be right
    hedge_all = f"The capital of {country} is {answer} or {key.rivals[0].title()}."
    assert judge.attributes(query, hedge_all)["wrong"] and score(hedge_all) < score(correct)
    # word salad is garbled, and garbled is wrong
    salad = "capital capital the is of of France Paris Paris the"
    assert judge.attributes(query, salad)["garbled"] and score(salad) < score(correct)
    behaviour = judge.expected_behavior(query, correct)
    assert set(behaviour) == {"pv", "clicks", "likes", "dislikes", "shaped_reward"}
    assert 0 < behaviour["likes"] <= behaviour["pv"] <= GoldJudge.IMPRESSIONS


def test_gold_refuses_unknown_queries(judge):
    with pytest.raises(KeyError, match="knows no query"):
        judge.expected_behavior("What is the meaning of life?", "42")


def test_every_held_out_query_holds_the_kept_ones_and_more_about_known_things(small_sim, tmp_path):
    path = small_sim / "simulate-logs" / "environment.json"
    env = json.loads(path.read_text())
    train = {q["text"] for q in env["queries"] if q["split"] == "train"}
    covered = {part for q in env["queries"] if q["split"] == "train" for part in q["item"].split("+")}
    kept = {q["text"] for q in env["queries"] if q["split"] == "eval"}
    judge = GoldJudge.load(path)
    with pytest.raises(KeyError, match="knows no query"):  # before: only the environment's queries
        judge.key(next(q.text for q in all_queries()[1] if q.text not in kept))
    every = judge.every_held_out_query()
    _, held = all_queries()
    about = {q.text: q for q in held}
    assert kept < set(every) and not set(every) & train and len(every) == len(set(every))
    assert all(part in covered for q in every for part in about[q].item.split("+"))
    assert len(every) == sum(all(part in covered for part in q.item.split("+")) for q in held)
    new = next(q for q in every if q not in kept)  # judged now, by the answer the world holds
    assert judge.expected_behavior(new, about[new].answer_sentence)["shaped_reward"] > \
        judge.expected_behavior(new, about[new].wrong_sentences[0])["shaped_reward"]
    tampered = dict(env, queries=[dict(q, rivals=["nowhere"]) if q["text"] == sorted(kept)[0] else q
                                  for q in env["queries"]])
    other = tmp_path / "environment.json"
    other.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="is judged otherwise in this version's simulated world"):
        GoldJudge.load(other).every_held_out_query()


def test_detected_attributes_are_the_ones_each_candidate_was_built_with():
    rng = np.random.default_rng(0)
    seen, held = all_queries()
    lexicon = Lexicon()
    pools = {}
    for q in seen + held:
        pools[q.text] = candidate_pool(rng, q, 8)
        lexicon.add(q.text)
        for text in [q.answer_sentence, *q.wrong_sentences] + [c.text for c in pools[q.text]]:
            lexicon.add(text)
    checked = 0
    for q in seen + held:
        key = QueryKey(q.intent, q.required, q.rivals)
        for cand in pools[q.text]:
            found = detect(key, cand.text, lexicon)
            built = {"correct": cand.answer == "correct", "missing": cand.answer == "missing",
                     "verbose": cand.verbose, "polite": cand.tone == "polite", "rude": cand.tone == "rude",
                     "source": cand.source, "hedging": cand.hedging, "repetition": cand.repetition, "garbled": False}
            assert {k: found[k] for k in built} == built, (q.text, cand.text)
            checked += 1
    assert checked > 3000


def test_the_gold_judge_reads_free_english_as_a_person_labels_it(judge):
    """Hand-written answers of every kind (correct, wrong, hedged, rude, polite, linked, long, abstaining,
    repeated, gibberish, word salad; >= 60 per intent), each labelled with its attributes by hand: the
    judge's attributes agree on >= 95% of (answer, attribute) pairs in every intent. Measured: factual
    99.4% (95.3% of answers exact), how-to and chit-chat 100%; the misses are "X is the capital of A and Y
    is the capital of B" (a repeated 4-word run: repetition) and one salad of the platform's own words."""
    from rlhb_cli.simulator.attributes import FEATURES
    keys = {q.text: QueryKey(q.intent, q.required, q.rivals) for q in sum(all_queries(), [])}
    rows = read_jsonl(Path(__file__).parent / "data" / "free_english_answers.jsonl")
    agree, answers = {}, {}
    for row in rows:
        key = keys[row["q"]]
        found = detect(key, row["a"], judge.lexicon)
        labels = set(row["labels"].split())
        assert labels <= set(FEATURES), row
        agree.setdefault(key.intent, []).extend((f in labels) == found[f] for f in FEATURES)
        answers.setdefault(key.intent, []).append(all((f in labels) == found[f] for f in FEATURES))
    assert {intent: len(a) >= 60 for intent, a in answers.items()} == {"factual": True, "howto": True, "chitchat": True}
    for intent, pairs in agree.items():
        assert np.mean(pairs) >= 0.95, (intent, np.mean(pairs))
        assert np.mean(answers[intent]) >= 0.9, (intent, np.mean(answers[intent]))


def test_default_traffic_meets_the_ceilings_the_design_needs(default_sim):
    summary = json.loads((default_sim / "summary.json").read_text())
    assert summary["impressions"] == 3_000_000
    assert summary["most_preferred_share"] >= 0.05
    assert summary["most_preferred_gold_reward"] > summary["gold_reward_mean_rows"] + 0.2
    assert 0.9 < summary["bayes_ceiling_auc"] < 1.0
    assert summary["best_in_pool_gold_reward"]["eval"] > summary["pool_mean_gold_reward"]["eval"]


def test_events_aggregate_back_to_the_same_totals(cli, tmp_path):
    out = tmp_path / "events"
    cli("simulate-logs", "--out", out, "--events", "--impressions", 20_000, "--queries", 30, "--eval-queries", 5,
        "--candidates", 4, "--windows", 1)
    events = read_jsonl(out / "logs.jsonl")
    assert len(events) == 20_000
    assert {"user_id", "user_segment", "viewed", "clicked", "liked", "disliked"} <= set(events[0])
    assert all(not (e["clicked"] or e["liked"] or e["disliked"]) or e["viewed"] for e in events)
    run_dir = tmp_path / "run"
    cli("prepare-behaviors", out / "logs.jsonl", "--run-dir", run_dir)
    summary = json.loads((run_dir / "prepare-behaviors" / "summary.json").read_text())
    assert summary["input_kind"] == "events" and summary["rows_in"] == 20_000 == summary["rows_kept"]
    assert summary["rows_out"] == len({(e["query"], e["response"]) for e in events})
    import datasets
    data = datasets.load_from_disk(str(run_dir / "prepare-behaviors" / "dataset"))
    total_views = sum(sum(data[s]["pv"]) for s in data)
    assert total_views == sum(e["viewed"] for e in events)


def test_the_sealed_world_is_about_facts_no_log_row_holds_and_leaves_the_rest_of_the_draw(cli, tmp_path, small_sim):
    """simulate-logs --sealed-facts N: N facts and tasks no training query is about, every phrasing of them
    kept for evaluation (environment.json's split "sealed"); evaluate --query-set sealed judges answers there
    with gold and reports that set's gain apart."""
    run = tmp_path / "run"
    cli("simulate-logs", "--run-dir", run, "--impressions", 200_000, "--queries", 120, "--eval-queries", 40,
        "--sealed-facts", 4)
    summary = json.loads((run / "simulate-logs" / "summary.json").read_text())
    sealed = summary["sealed_facts"]
    assert len(sealed) == 4 and len({s.split(":")[0] for s in sealed}) == 4  # one of each kind
    environment = json.loads((run / "simulate-logs" / "environment.json").read_text())
    by_split = {}
    for q in environment["queries"]:
        by_split.setdefault(q["split"], []).append(q)
    assert {q["item"] for q in by_split["sealed"]} == set(sealed) and len(by_split["sealed"]) == summary["sealed_queries"]
    entities = [s.split(":", 1)[1].lower() for s in sealed]
    logged = {row["query"].lower() for row in read_jsonl(run / "simulate-logs" / "logs.jsonl")}
    assert not any(e in q for e in entities for q in logged)  # no row, not even a combination, is about them
    assert not any(part in sealed for q in by_split["train"] + by_split["eval"] for part in q["item"].split("+"))
    gold = GoldJudge.load(run / "simulate-logs" / "environment.json")
    sealed_query = by_split["sealed"][0]
    best = max(sealed_query["pool"], key=lambda c: c["gold_shaped_reward"])
    assert gold.expected_behavior_batch([sealed_query["text"]], [best["text"]])["shaped_reward"][0] == \
        pytest.approx(best["gold_shaped_reward"], abs=1e-6)
    assert not any(q["split"] == "sealed" for q in json.loads(
        (small_sim / "simulate-logs" / "environment.json").read_text())["queries"])  # 0 (the default): none
    assert json.loads((small_sim / "simulate-logs" / "summary.json").read_text())["sealed_facts"] == []


def test_sealing_facts_changes_no_other_draw_when_none_is_sealed():
    from rlhb_cli.simulator.world import choose_queries, sealed_items
    first, again = np.random.default_rng(3), np.random.default_rng(3)
    assert sealed_items(first, 0) == [] and first.random() == again.random()  # no draw consumed
    train, held = choose_queries(np.random.default_rng(5), 200, 40, sealed_items(np.random.default_rng(5), 6))
    assert len(train) == 200 and len(held) == 40
    with pytest.raises(ValueError, match="at most half"):
        sealed_items(np.random.default_rng(0), 60)
