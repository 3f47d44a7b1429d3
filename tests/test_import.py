"""Importing the real public data in ../shared/data, read in place."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import SHARED_DATA, read_jsonl
from rlhb_cli.behaviors.importers import html_to_text

SE = SHARED_DATA / "stackexchange-cardano"
OASST = SHARED_DATA / "oasst1-en100" / "en_100_tree.jsonl"


def test_stackexchange_gives_one_row_per_answer_with_score_as_likes_minus_dislikes(cli, tmp_path):
    out, pairs = tmp_path / "se.jsonl", tmp_path / "pairs.jsonl"
    cli("import", "stackexchange", SE, "--out", out, "--pairs", pairs)
    rows = read_jsonl(out)
    assert len(rows) == 1496
    scores = {r.attrib["Id"]: int(r.attrib["Score"]) for r in ET.parse(SE / "Posts.xml").getroot()
              if r.attrib.get("PostTypeId") == "2"}
    assert {r["answer_id"] for r in rows} == set(scores)
    assert all(r["likes"] - r["dislikes"] == scores[r["answer_id"]] for r in rows)
    assert not any(re.search(r"</?p>|&lt;|&amp;", r["response"]) for r in rows)
    assert sum(r["accepted"] for r in rows) > 0 and any(r["clicks"] > 0 for r in rows)
    manifest = json.loads((tmp_path / "se.jsonl.manifest.json").read_text())
    assert manifest["status"] == "done" and set(manifest["inputs"]) == {"Posts.xml", "Votes.xml", "Comments.xml"}
    pair_rows = read_jsonl(pairs)
    assert len(pair_rows) == manifest["summary"]["pairs"] > 300
    by_text = {r["response"]: r["score"] for r in rows}
    assert all(by_text[p["chosen"]] > by_text[p["rejected"]] for p in pair_rows)

    run_dir = tmp_path / "run"
    cli("prepare-behaviors", out, "--run-dir", run_dir, "--keep-field", "accepted")
    summary = json.loads((run_dir / "prepare-behaviors" / "summary.json").read_text())
    assert summary["rows_kept"] == 1496 and summary["rows_rejected"] == 0
    assert "user_id replaced by a salted hash" in summary["notes"]


def test_oasst_gives_one_row_per_assistant_reply(cli, tmp_path):
    out, pairs = tmp_path / "oa.jsonl", tmp_path / "pairs.jsonl"
    cli("import", "oasst", OASST, "--out", out, "--pairs", pairs)
    rows = read_jsonl(out)

    def replies(message):
        return (message["role"] == "assistant") + sum(replies(r) for r in message.get("replies", []))

    expected = sum(replies(json.loads(line)["prompt"]) for line in OASST.read_text().splitlines())
    assert len(rows) == expected == 687
    assert all(r["pv"] >= r["likes"] + r["dislikes"] for r in rows)
    assert any("Assistant: " in r["query"] for r in rows)  # multi-turn prompts carry the conversation

    def messages(message):
        return 1 + sum(messages(r) for r in message.get("replies", []))
    summary = json.loads((tmp_path / "oa.jsonl.manifest.json").read_text())["summary"]
    assert summary["messages"] == sum(messages(json.loads(line)["prompt"]) for line in OASST.read_text().splitlines())
    assert summary["trees"] == 100
    from rlhb_cli.stages.dpo import read_pairs
    turns, broken = read_pairs(pairs)  # the pairs as conversations, as train-dpo reads them
    assert turns and not broken and sum(len(p["messages"]) > 1 for p in turns) > 0
    assert len({r["tree"] for r in rows}) == 100
    run_dir = tmp_path / "run"
    cli("prepare-behaviors", out, "--run-dir", run_dir, "--group-field", "tree")
    summary = json.loads((run_dir / "prepare-behaviors" / "summary.json").read_text())
    assert summary["rows_kept"] == 687
    import datasets
    data = datasets.load_from_disk(str(run_dir / "prepare-behaviors" / "dataset"))
    trees = [set(data[s]["tree"]) for s in ("train", "validation", "test")]
    assert not (trees[0] & trees[2] or trees[1] & trees[2] or trees[0] & trees[1]) and len(trees[2]) == 10


def test_html_to_text_keeps_paragraphs_and_decodes_entities():
    assert html_to_text("<p>a &amp; b</p><p>c<br>d</p><ul><li>x</li></ul>") == "a & b\n\nc\nd\n\n- x"


def test_bad_dump_gets_one_line(cli, tmp_path):
    (tmp_path / "Votes.xml").write_text("<votes><row Id='1' PostId='1' VoteTypeId='2' /></votes>")
    (tmp_path / "Posts.xml").write_text("<posts><row Id='1' PostTypeId='1' ")
    result = cli("import", "stackexchange", tmp_path, "--out", tmp_path / "o.jsonl", ok=False)
    assert result.exit_code == 2 and "Posts.xml:1: not well-formed XML" in result.output
    assert not (tmp_path / "o.jsonl").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # a failed import leaves nothing half-written behind


def _dump(folder: Path, posts: list[str], votes: list[str]) -> Path:
    folder.mkdir()
    (folder / "Posts.xml").write_text("<posts>" + "".join(posts) + "</posts>")
    (folder / "Votes.xml").write_text("<votes>" + "".join(votes) + "</votes>")
    return folder


def test_stackexchange_rows_it_cannot_use_are_counted_with_their_reason(cli, tmp_path):
    dump = _dump(tmp_path / "dump", [
        "<row Id='1' PostTypeId='1' Title='Q' Body='&lt;p&gt;q&lt;/p&gt;' ViewCount='10' />",
        "<row Id='2' PostTypeId='2' ParentId='1' Body='a' Score='1' />",
        "<row Id='2' PostTypeId='2' ParentId='1' Body='again' Score='3' />",  # a duplicate post id
        "<row Id='3' PostTypeId='2' ParentId='1' Body='b' Score='many' />",  # a score that is no number
        "<row Id='4' PostTypeId='1' Title='Q2' Body='q2' ViewCount='lots' />",
        "<row PostTypeId='2' ParentId='1' Body='no id' />",
    ], ["<row Id='1' PostId='2' VoteTypeId='2' />", "<row Id='2' VoteTypeId='3' />"])  # a vote without a post
    out = tmp_path / "se.jsonl"
    result = cli("import", "stackexchange", dump, "--out", out)
    assert "Traceback" not in result.output
    summary = json.loads((tmp_path / "se.jsonl.manifest.json").read_text())["summary"]
    ledger = read_jsonl(tmp_path / "se.jsonl.rejected.jsonl")
    assert [(r["where"], r["reason"], r["kind"]) for r in ledger] == [
        ("dump/Votes.xml row 2", "a vote without PostId", "rejected"),
        ("dump/Posts.xml row 3 (Id 2)", "post Id 2 appears again (the first one is kept)", "duplicate"),
        ("dump/Posts.xml row 4 (Id 3)", "Score 'many' is not a whole number", "rejected"),
        ("dump/Posts.xml row 5 (Id 4)", "ViewCount 'lots' is not a whole number", "rejected"),
        ("dump/Posts.xml row 6", "Id '' is not a post id", "rejected"),
    ]
    # every post is a question, an answer written out, or in the ledger: in = kept + rejected + duplicate
    assert summary["posts_in"] == summary["questions"] + summary["answers"] + 4 == 6
    assert summary["rejected"] == 4 and summary["duplicate"] == 1 and len(read_jsonl(out)) == 1


OA_TREE = {"message_id": "p", "role": "prompter", "text": "hi", "replies": [
    {"message_id": "a", "role": "assistant", "text": "hello", "emojis": {"+1": 2}, "replies": []}]}


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\xff\xfe binary", "oa.jsonl:1: not UTF-8 text"),
    (json.dumps(OA_TREE).encode("utf-16"), "oa.jsonl:1: not UTF-8 text (it looks like UTF-16: save it as UTF-8)"),
    (None, "oa.jsonl: is a directory"),
])
def test_oasst_files_that_are_not_utf8_json_lines_get_one_line(cli, tmp_path, content, message):
    path = tmp_path / "oa.jsonl"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    result = cli("import", "oasst", path, "--out", tmp_path / "o.jsonl", ok=False)
    assert result.exit_code == 2 and message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "o.jsonl").exists()


def test_oasst_trees_that_cannot_be_read_whole_are_counted_with_their_reason(cli, tmp_path):
    def tree(**reply):
        return {**OA_TREE, "replies": [{**OA_TREE["replies"][0], **reply}]}
    level = '{"message_id": "m", "role": "prompter", "text": "x", "replies": ['
    deep = level * 3000 + '{"text": "leaf"}' + "]}" * 3000  # deeper than Python's JSON reader recurses
    lines = [json.dumps(OA_TREE), json.dumps(tree(emojis={"+1": "many"})), json.dumps(tree(replies="none")),
             json.dumps({**OA_TREE, "message_id": "p2"}), deep, json.dumps(tree(role=None))]
    path = tmp_path / "oa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cli("import", "oasst", path, "--out", tmp_path / "o.jsonl")
    ledger = read_jsonl(tmp_path / "o.jsonl.rejected.jsonl")
    assert [(r["where"], r["reason"]) for r in ledger] == [
        ("line 2", "message a: reaction '+1' is 'many', not a count"),
        ("line 3", "message a: field 'replies' is not a list of messages"),
        ("line 5", "nested deeper than a JSON reader may go"),
        ("line 6", "message a: field 'role' is None, neither prompter nor assistant"),
    ]
    summary = json.loads((tmp_path / "o.jsonl.manifest.json").read_text())["summary"]
    assert summary["trees"] == 2 and summary["rejected"] == 4 and len(read_jsonl(tmp_path / "o.jsonl")) == 2


def _flat_messages(tree: dict, parent=None) -> list[dict]:
    """A nested tree as oasst1's flat messages: one per line, each naming its parent."""
    message = {k: v for k, v in tree.items() if k != "replies"} | {"parent_id": parent}
    return [message] + [m for reply in tree.get("replies", []) for m in _flat_messages(reply, tree["message_id"])]


def test_oasst_flat_messages_give_the_same_rows_and_pairs_as_their_trees(cli, tmp_path):
    flat = tmp_path / "messages.jsonl"
    messages = [m for line in OASST.read_text().splitlines() for m in _flat_messages(json.loads(line)["prompt"])]
    flat.write_text("".join(json.dumps(m) + "\n" for m in messages))
    cli("import", "oasst", OASST, "--out", tmp_path / "trees.jsonl", "--pairs", tmp_path / "trees.pairs.jsonl")
    cli("import", "oasst", flat, "--out", tmp_path / "flat.jsonl", "--pairs", tmp_path / "flat.pairs.jsonl")
    assert read_jsonl(tmp_path / "flat.jsonl") == read_jsonl(tmp_path / "trees.jsonl")
    assert read_jsonl(tmp_path / "flat.pairs.jsonl") == read_jsonl(tmp_path / "trees.pairs.jsonl")
    summary = json.loads((tmp_path / "flat.jsonl.manifest.json").read_text())["summary"]
    assert summary["format"] == "messages" and summary["messages"] == len(messages) == 1167
    assert summary["trees"] == 100 and summary["rejected"] == summary["duplicate"] == 0


def test_oasst_flat_messages_that_join_no_tree_are_counted_line_by_line(cli, tmp_path):
    good = _flat_messages(OA_TREE)  # lines 1-2: kept
    lines = good + [
        {"message_id": "orphan", "parent_id": "gone", "role": "assistant", "text": "x"},        # 3: parent missing
        {"message_id": "below", "parent_id": "orphan", "role": "prompter", "text": "y"},        # 4: under it
        {"message_id": "c1", "parent_id": "c2", "role": "prompter", "text": "z"},               # 5: a cycle
        {"message_id": "c2", "parent_id": "c1", "role": "assistant", "text": "z"},              # 6
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "again"},            # 7: repeated id
        {"message_id": "r2", "parent_id": None, "role": "prompter", "text": "q"},               # 8: tree without a
        {"message_id": "no-role", "parent_id": "r2", "text": "w"},                              # 9: role, rejected
        OA_TREE,                                                                                # 10: nested
    ]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    cli("import", "oasst", path, "--out", tmp_path / "o.jsonl")
    ledger = read_jsonl(tmp_path / "o.jsonl.rejected.jsonl")
    assert sorted((r["where"], r["kind"], r["reason"]) for r in ledger) == sorted([
        ("line 10", "rejected", "not a flat message (no 'parent_id', or nested 'replies') in a file of flat messages"),
        ("line 7", "duplicate", "message a appears again (line 2 is kept)"),
        ("line 3", "rejected", "message orphan: its parent gone is not among the file's messages"),
        ("line 4", "rejected", "message below: under message orphan, whose parent gone is not among the file's messages"),
        ("line 5", "rejected", "message c1: in or under a cycle of replies (no root prompt above it)"),
        ("line 6", "rejected", "message c2: in or under a cycle of replies (no root prompt above it)"),
        ("line 8", "rejected", "in the tree of line 8: message no-role: field 'role' is None, neither prompter nor assistant"),
        ("line 9", "rejected", "in the tree of line 8: message no-role: field 'role' is None, neither prompter nor assistant"),
    ])
    summary = json.loads((tmp_path / "o.jsonl.manifest.json").read_text())["summary"]
    assert summary["messages"] + summary["rejected"] + summary["duplicate"] == len(lines)  # in = kept + rejected + dup
    assert summary["trees"] == 1 and read_jsonl(tmp_path / "o.jsonl")[0]["response"] == "hello"


def test_several_dumps_make_one_log_with_their_sites_and_filters_are_counted(cli, tmp_path):
    other = tmp_path / "stackexchange-other"
    other.symlink_to(SE, target_is_directory=True)  # a second site (the same files, another name)
    out = tmp_path / "both.jsonl"
    cli("import", "stackexchange", SE, other, "--out", out, "--pairs", tmp_path / "pairs.jsonl")
    rows = read_jsonl(out)
    summary = json.loads((tmp_path / "both.jsonl.manifest.json").read_text())["summary"]
    assert summary["sites"] == ["cardano", "other"] and summary["answers"] == len(rows) == 2 * 1496
    assert sorted({r["site"] for r in rows}) == ["cardano", "other"]
    assert all(r["user_id"].startswith(r["site"] + ":") for r in rows if "user_id" in r)
    assert summary["pairs"] == len(read_jsonl(tmp_path / "pairs.jsonl")) > 600  # each site its own pairs
    manifest = json.loads((tmp_path / "both.jsonl.manifest.json").read_text())
    assert {"cardano/Posts.xml", "other/Votes.xml"} <= set(manifest["inputs"])

    views = sorted(r["pv"] for r in rows if r["site"] == "cardano")
    created = {r.attrib["Id"]: r.attrib["CreationDate"] for r in ET.parse(SE / "Posts.xml").getroot()}
    filtered = tmp_path / "filtered.jsonl"
    cli("import", "stackexchange", SE, "--out", filtered, "--min-views", 114, "--since", "2021-10-01")
    kept = read_jsonl(filtered)
    summary = json.loads((tmp_path / "filtered.jsonl.manifest.json").read_text())["summary"]
    assert all(r["pv"] >= 114 and created[r["answer_id"]] >= "2021-10-01" for r in kept)
    assert summary["filtered_min_views"] == sum(v < 114 for v in views) > 0
    assert len(kept) + summary["filtered_min_views"] + summary["filtered_since"] == 1496
    assert summary["filtered_since"] == sum(1 for r in rows if r["site"] == "cardano" and r["pv"] >= 114
                                            and created[r["answer_id"]] < "2021-10-01") > 0

    bad = cli("import", "stackexchange", SE, "--out", tmp_path / "x.jsonl", "--since", "last week", ok=False)
    assert bad.exit_code == 2 and "--since 'last week': give a date as YYYY-MM-DD" in bad.output
    twice = cli("import", "stackexchange", SE, SE, "--out", tmp_path / "y.jsonl", ok=False)
    assert twice.exit_code == 2 and "two dumps of one site" in twice.output
