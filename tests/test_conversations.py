"""Personas and simulated multi-turn conversations (ALOE's data, issue 28): the diversity rule, reactions that
follow the persona's gold utility, remarks that never name the persona, the preference tree's shape, and a
conversation that answers to what the policy said."""

from __future__ import annotations

import json
import numpy as np
import pytest

from rlhb_cli.simulator.attributes import FEATURES
from rlhb_cli.simulator.conversations import REMARKS, World, converse, react, remark
from rlhb_cli.simulator.personas import STYLE, describe, sample_personas, style_vector

from conftest import read_jsonl


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple:
    from typer.testing import CliRunner

    from rlhb_cli.cli import app
    run = tmp_path_factory.mktemp("conversations")
    result = CliRunner().invoke(app, ["simulate-conversations", "--run-dir", str(run), "--personas", "1000",
                                      "--eval-personas", "100", "--conversations", "200", "--turns", "5"])
    assert result.exit_code == 0, result.output
    folder = run / "simulate-conversations"
    return (read_jsonl(folder / "personas.jsonl"), read_jsonl(folder / "conversations.jsonl"),
            read_jsonl(folder / "preference_tree.jsonl"), json.loads((folder / "summary.json").read_text()))


def test_a_thousand_personas_each_far_enough_from_every_other(simulated):
    personas, conversations, _, summary = simulated
    assert len(personas) == 1000 and sum(p["split"] == "eval" for p in personas) == 100
    styles = np.array([style_vector(p["weights"]) for p in personas])
    distances = np.sqrt(((styles[:, None] - styles[None]) ** 2).sum(-1))
    assert distances[np.triu_indices(len(styles), 1)].min() >= 0.35
    assert all(p["description"] == describe(p["weights"]) for p in personas)
    held_out = {p["id"] for p in personas if p["split"] == "eval"}
    assert not held_out & {c["user_id"] for c in conversations}  # held-out personas only meet the evaluation
    assert summary["personas"] == 1000


def test_the_rule_refuses_what_it_cannot_meet_and_a_seed_repeats_itself():
    with pytest.raises(ValueError, match="lie 3.0 apart"):
        sample_personas(np.random.default_rng(0), 200, 10, min_distance=3.0, max_draws=5)
    first, second = (sample_personas(np.random.default_rng(7), 50, 5, 0.35) for _ in range(2))
    assert [p.to_json() for p in first] == [p.to_json() for p in second]


def test_no_text_the_policy_sees_holds_a_description_or_a_persona_name(simulated):
    personas, conversations, tree, _ = simulated
    descriptions = {p["description"] for p in personas}
    phrases = {part.strip(" .") for d in descriptions for part in d.removeprefix("A user who ").split(" and ")
               for part in part.split(", ")}
    seen = [t[k] for c in conversations for t in c["turns"] for k in ("user", "reply")]
    seen += [m["content"] for pair in tree for m in pair["messages"]] + [p[k] for p in tree for k in ("chosen", "rejected")]
    for text in seen:
        assert not any(d in text for d in descriptions)
        assert not any(phrase in text for phrase in phrases if len(phrase) > 12), text
        assert "persona" not in text.lower()
    assert any(c["turns"][1]["user"] != c["turns"][1]["query"] for c in conversations)  # remarks were made


def test_a_reply_the_persona_prefers_draws_more_likes_and_fewer_dislikes():
    profile = sample_personas(np.random.default_rng(1), 5, 1, 0.35)[0]
    persona = profile.user_model()
    good = np.zeros(len(FEATURES))
    good[FEATURES.index("correct")] = 1
    bad = np.zeros(len(FEATURES))
    bad[[FEATURES.index("wrong"), FEATURES.index("rude")]] = 1
    rng = np.random.default_rng(0)
    draws = {name: [react(rng, persona, features, "factual") for _ in range(3000)]
             for name, features in (("good", good), ("bad", bad))}
    share = {name: {k: np.mean([d[k] for d in rows]) for k in ("like", "dislike", "view")} for name, rows in draws.items()}
    assert share["good"]["like"] > share["bad"]["like"] + 0.1
    assert share["good"]["dislike"] < share["bad"]["dislike"]
    assert all(d["like"] + d["dislike"] <= d["view"] for rows in draws.values() for d in rows)


def test_remarks_follow_the_taste_without_naming_it():
    rng = np.random.default_rng(0)
    verbose = np.zeros(len(FEATURES))
    verbose[[FEATURES.index("correct"), FEATURES.index("verbose")]] = 1
    terse_lover = dict.fromkeys(FEATURES, 0.0) | {"verbose": -1.4}
    detail_lover = dict.fromkeys(FEATURES, 0.0) | {"verbose": 0.9}
    long_remarks = next(r[3] for r in REMARKS if r[0] == "verbose" and r[1])
    assert remark(rng, terse_lover, verbose) in long_remarks
    assert remark(rng, detail_lover, verbose) == ""
    short = verbose.copy()
    short[FEATURES.index("verbose")] = 0
    assert remark(rng, detail_lover, short) in next(r[3] for r in REMARKS if r[0] == "verbose" and not r[1])


def test_the_tree_continues_from_one_branch_and_keeps_the_other_as_rejected(simulated):
    _, conversations, tree, summary = simulated
    by_conversation = {c["conversation"]: c for c in conversations}
    assert tree and summary["pairs"] == len(tree)
    assert summary["pairs"] + summary["ties"] == summary["turns"]
    for pair in tree:
        assert pair["chosen"] != pair["rejected"] and pair["chosen_utility"] > pair["rejected_utility"]
        turns = by_conversation[pair["conversation"]]["turns"]
        shown = turns[pair["turn"] - 1]["reply"]
        assert shown == pair[pair["continued"]]  # the branch taken is the reply the user reacted to
        assert pair["messages"][-1] == {"role": "user", "content": turns[pair["turn"] - 1]["user"]}
        for later in (p for p in tree if p["conversation"] == pair["conversation"] and p["turn"] > pair["turn"]):
            # every later turn's history holds the branch taken at this turn, never the other
            assert later["messages"][2 * (pair["turn"] - 1) + 1] == {"role": "assistant", "content": shown}
    continued = {p["continued"] for p in tree}
    assert continued == {"chosen", "rejected"}


def test_the_user_answers_to_what_the_policy_said():
    """Interactive: a wrong answer at turn 1 is asked again in other words at turn 2; a correct one moves on,
    and the reactions differ."""
    world = World(np.random.default_rng(0), 120, 6)
    profile = sample_personas(np.random.default_rng(2), 5, 1, 0.35)[0]
    factual = next(q for q in world.queries if q.intent == "factual" and len(world.by_item[q.item]) > 1)
    world.queries = [factual]  # the conversation opens with this query

    def policy(right: bool):
        def reply(query, messages):
            return query.answer_sentence if right else query.wrong_sentences[0]
        return reply

    turns = {right: converse(np.random.default_rng(3), world, profile, 2, 1.0, policy(right))[0]
             for right in (True, False)}
    assert turns[False][1]["asked_again"] and turns[False][1]["query"] != factual.text
    assert world.by_item[factual.item] and any(q.text == turns[False][1]["query"] for q in world.by_item[factual.item])
    assert not turns[True][1]["asked_again"]
    assert turns[True][0]["utility"] > turns[False][0]["utility"]
    assert turns[False][1]["user"] != turns[True][1]["user"]


def test_style_is_what_personas_differ_on():
    assert set(STYLE) <= set(FEATURES)
    assert describe(dict.fromkeys(FEATURES, 0.0)).startswith("A user with no strong taste")
    assert describe(dict.fromkeys(FEATURES, 0.0) | {"verbose": -1.0, "source": 1.0}) == (
        "A user who wants short, to-the-point answers and wants to know where information comes from.")


class _Template:
    """A tokenizer's chat template, as far as PromptFormat uses it: turns rendered as <|role|>content."""

    chat_template = "yes"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def test_a_conversation_as_a_log_query_is_prompted_as_its_turns_in_both_formats():
    from rlhb_cli.prompts import PromptFormat, conversation_of, conversation_query, judge_text
    turns = [{"role": "user", "content": "How do I peel garlic?"}, {"role": "assistant", "content": "Crush it."},
             {"role": "user", "content": "Shorter next time, please. What is a router?"}]
    query = conversation_query(turns)
    assert conversation_of(query) == turns and conversation_query(turns[:1]) == "How do I peel garlic?"
    assert conversation_of("How do I peel garlic?") == turns[:1]
    for prompt in (PromptFormat("plain"), PromptFormat("chat", _Template())):
        assert prompt.prompt(query, "liked by many") == prompt.conversation_prompt(turns, "liked by many")
        assert prompt.prompt(turns[0]["content"]) == prompt.conversation_prompt(turns[:1])
    chat = PromptFormat("chat", _Template()).prompt(query, "liked by many")
    assert chat.index("<|system|>") < chat.index("<|user|>How do I") < chat.index("<|assistant|>Crush it.")
    long = conversation_query([{"role": "user", "content": "x" * 2000}] + turns[1:])
    assert judge_text(long, "A router routes.").split("\nAnswer: ")[0].endswith("What is a router?")  # latest turn kept


def test_conversation_logs_have_a_row_per_turn_and_split_by_conversation(cli, tmp_path):
    import datasets

    from rlhb_cli.prompts import conversation_of
    cli("simulate-conversations", "--run-dir", tmp_path, "--personas", 40, "--eval-personas", 8,
        "--conversations", 100, "--turns", 4, "--queries", 40)
    folder = tmp_path / "simulate-conversations"
    conversations, rows = read_jsonl(folder / "conversations.jsonl"), read_jsonl(folder / "conversation_logs.jsonl")
    assert len(rows) == sum(len(c["turns"]) for c in conversations) == 400
    for row in rows:
        said = conversation_of(row["query"])
        assert len(said) == 2 * row["turn"] - 1 and said[-1]["role"] == "user"
    first = conversations[0]["turns"]
    assert conversation_of(rows[3]["query"])[2] == {"role": "user", "content": first[1]["user"]}
    assert rows[3]["likes"] == first[3]["like"] and rows[3]["response"] == first[3]["reply"]
    cli("prepare-behaviors", "--run-dir", tmp_path, "--from-stage", "simulate-conversations",
        "--group-field", "conversation")
    summary = json.loads((tmp_path / "prepare-behaviors" / "summary.json").read_text())
    assert summary["rows_kept"] == 400 and summary["rows_duplicate"] == 0  # two conversations: two sessions
    data = datasets.load_from_disk(str(tmp_path / "prepare-behaviors" / "dataset"))
    owners = {}
    for split in ("train", "validation", "test"):
        for conversation in data[split]["conversation"]:
            owners.setdefault(conversation, set()).add(split)
    assert all(len(splits) == 1 for splits in owners.values()) and len(owners) == 100
    assert {len(data[s]) for s in ("validation", "test")} != {0}
    missing = cli("prepare-behaviors", "--run-dir", tmp_path / "other", "--from-stage", "simulate-conversations",
                  ok=False)
    assert missing.exit_code == 2 and "simulate-conversations" in missing.output and "Traceback" not in missing.output


def test_the_oracle_over_conversations_pays_each_reply_what_its_personas_gold_says(cli, tmp_path):
    from rlhb_cli.errors import RlhbError
    from rlhb_cli.simulator.conversations import ConversationGold
    cli("simulate-conversations", "--run-dir", tmp_path, "--personas", 40, "--eval-personas", 8,
        "--conversations", 50, "--turns", 3, "--queries", 40)
    folder = tmp_path / "simulate-conversations"
    gold = ConversationGold(folder)
    conversation = read_jsonl(folder / "conversations.jsonl")[0]
    row = read_jsonl(folder / "conversation_logs.jsonl")[2]  # its third turn: one persona sent this conversation
    persona = next(p for p in gold.asked[row["query"]])[0]
    query = next(q for q in gold.world.queries if q.text == conversation["turns"][2]["query"])
    pool = gold.world.pools[query.text]
    ranked = sorted(pool, key=lambda text: gold.world.utility(persona, query, [text])[0])
    worst, best = gold.score([row["query"]] * 2, [ranked[0], ranked[-1]])
    assert (worst, best) == (0.0, 1.0) and len(gold.asked[row["query"]]) == 1
    opening = read_jsonl(folder / "conversation_logs.jsonl")[0]["query"]  # an opening many personas may share
    mean = np.mean([gold.world.scale(p, q, gold.world.utility(p, q, [ranked[-1]])[0]) for p, q in gold.asked[opening]])
    assert gold.score([opening], [ranked[-1]])[0] == pytest.approx(mean / 100)
    with pytest.raises(RlhbError, match="no simulated conversation holds"):
        gold.score(["What is the capital of Mars?"], ["x"])


def test_the_policys_own_history_replaces_each_earlier_reply_turn_by_turn():
    """`--history policy`: every earlier assistant turn is the policy's reply to the conversation before it (the
    second sees the policy's first), the users' turns stay as logged, a one-turn query is left alone; the
    oracle and the users' side read such a conversation as the logged one."""
    from rlhb_cli.prompts import conversation_of, conversation_query, users_side
    from rlhb_cli.rl.history import with_policy_history
    logged = conversation_query([{"role": "user", "content": "What is a router?"},
                                 {"role": "assistant", "content": "A box."},
                                 {"role": "user", "content": "Too short. Where is that from?"},
                                 {"role": "assistant", "content": "From a book."},
                                 {"role": "user", "content": "And a switch?"}])
    asked = []

    def reply(talks, behaviors):
        asked.append([(len(t), behaviors[i]) for i, t in enumerate(talks)])
        return [f"mine {len(t)}\n\nUser: not a turn" for t in talks]
    out = with_policy_history([logged, "Just one question?"], ["liked", "liked"], reply)
    assert asked == [[(1, "liked")], [(3, "liked")]] and out[1] == "Just one question?"
    turns = conversation_of(out[0])
    assert [t["content"] for t in turns] == ["What is a router?", "mine 1\nUser: not a turn",
                                              "Too short. Where is that from?", "mine 3\nUser: not a turn",
                                              "And a switch?"]
    assert users_side(out[0]) == users_side(logged) != logged and users_side("Just one?") == "Just one?"


def test_rl_over_conversations_with_the_policys_own_history(cli, tmp_path):
    """train-oracle --history policy on conversation logs: the rollouts' conversations hold the users' logged turns
    and replies that the platform never showed (the policy's), and the oracle still pays each of them."""
    from rlhb_cli.prompts import conversation_of, users_side
    cli("simulate-conversations", "--run-dir", tmp_path, "--personas", 40, "--eval-personas", 8,
        "--conversations", 100, "--turns", 3, "--queries", 40)
    cli("prepare-behaviors", "--run-dir", tmp_path, "--from-stage", "simulate-conversations",
        "--group-field", "conversation")
    cli("train-sft", "--run-dir", tmp_path, "--epochs", 1, "--max-train-rows", 600, "--tiny-hidden-size", 32,
        "--tiny-layers", 1, "--tiny-heads", 2, "--tiny-vocab-size", 400, "--learning-rate", 0.01)
    cli("train-oracle", "--run-dir", tmp_path, "--history", "policy", "--iterations", 2, "--prompts-per-iteration", 8,
        "--rollouts", 1, "--minibatch-size", 8, "--max-new-tokens", 8, "--ppo-epochs", 1, "--sample-every", 1)
    logged = {users_side(r["query"]): r["query"]
              for r in read_jsonl(tmp_path / "simulate-conversations" / "conversation_logs.jsonl")}
    samples = read_jsonl(tmp_path / "train-oracle" / "samples.jsonl")
    later = [s for s in samples if len(conversation_of(s["query"])) > 1]
    assert later and all(users_side(s["query"]) in logged and s["query"] != logged[users_side(s["query"])]
                         for s in later)
    assert all(0.0 <= s["reward"] <= 1.0 for s in samples)
    config = json.loads((tmp_path / "train-oracle" / "manifest.json").read_text())["config"]
    assert config["history"] == "policy"
