"""Importing the real public data in ../shared/data, read in place."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

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
    assert len(read_jsonl(pairs)) > 0
    run_dir = tmp_path / "run"
    cli("prepare-behaviors", out, "--run-dir", run_dir)
    summary = json.loads((run_dir / "prepare-behaviors" / "summary.json").read_text())
    assert summary["rows_kept"] == 687


def test_html_to_text_keeps_paragraphs_and_decodes_entities():
    assert html_to_text("<p>a &amp; b</p><p>c<br>d</p><ul><li>x</li></ul>") == "a & b\n\nc\nd\n\n- x"


def test_bad_dump_gets_one_line(cli, tmp_path):
    (tmp_path / "Votes.xml").write_text("<votes><row Id='1' PostId='1' VoteTypeId='2' /></votes>")
    (tmp_path / "Posts.xml").write_text("<posts><row Id='1' PostTypeId='1' ")
    result = cli("import", "stackexchange", tmp_path, "--out", tmp_path / "o.jsonl", ok=False)
    assert result.exit_code == 2 and "Posts.xml:1: not well-formed XML" in result.output
    assert not (tmp_path / "o.jsonl").exists()
