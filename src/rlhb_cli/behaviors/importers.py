"""Real public behaviour data into the log format: Stack Exchange dumps and OpenAssistant trees.

Stack Exchange (one row per answer): query = question title + body, response = answer body (HTML to
plain text), pv = the question's ViewCount (shared by sibling answers), likes = upvotes, dislikes =
downvotes (Votes.xml types 2 and 3), clicks = comments on the answer (Comments.xml; the dump has no
clicks, comments are the nearest proxy). The XML is streamed and questions are kept in a temporary
SQLite table, so a multi-GB dump runs in bounded memory.

OpenAssistant (one row per assistant reply): query = the conversation up to the reply, likes = "+1",
dislikes = "-1", pv = max(review_count, likes + dislikes) (anyone who reacted saw it), clicks = 0 (no
such signal). Both can write the preference pairs they imply.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from rlhb_cli.errors import RlhbError

_BLOCK_TAGS = {"p", "br", "li", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div", "hr", "ul", "ol"}


class _TextOfHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML body: tags gone, entities decoded, paragraphs kept as blank lines."""
    parser = _TextOfHtml()
    parser.feed(html or "")
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    text, blank = [], False
    for line in lines:
        if line.strip():
            text.append(line)
            blank = False
        elif text and not blank:
            text.append("")
            blank = True
    return "\n".join(text).strip()


def _rows(path: Path) -> Iterator[dict]:
    """Stream the <row .../> elements of a Stack Exchange XML file, freeing each one once read."""
    if not path.exists():
        raise RlhbError(f"{path}: no such file (a Stack Exchange dump folder holds Posts.xml, Votes.xml, Comments.xml)")
    try:
        for _, element in ET.iterparse(path, events=("end",)):
            if element.tag == "row":
                yield element.attrib
                element.clear()
    except ET.ParseError as exc:
        raise RlhbError(f"{path}:{exc.position[0]}: not well-formed XML ({exc})") from None


def import_stackexchange(dump: Path, out, pairs_out=None) -> dict:
    """Write one log row per answer to `out` (a text stream); return counts."""
    dump = Path(dump)
    up, down, comments = defaultdict(int), defaultdict(int), defaultdict(int)
    for row in _rows(dump / "Votes.xml"):
        kind = row.get("VoteTypeId")
        if kind == "2":
            up[row["PostId"]] += 1
        elif kind == "3":
            down[row["PostId"]] += 1
    comments_path = dump / "Comments.xml"
    if comments_path.exists():
        for row in _rows(comments_path):
            comments[row["PostId"]] += 1
    counts = {"questions": 0, "answers": 0, "answers_without_question": 0, "pairs": 0, "score_mismatches": 0}
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "posts.sqlite")
        db.execute("CREATE TABLE q (id TEXT PRIMARY KEY, query TEXT, views INTEGER, accepted TEXT)")
        db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, parent TEXT, body TEXT, score INTEGER, owner TEXT)")
        for row in _rows(dump / "Posts.xml"):
            if row.get("PostTypeId") == "1":
                query = (row.get("Title", "").strip() + "\n\n" + html_to_text(row.get("Body", ""))).strip()
                db.execute("INSERT INTO q VALUES (?, ?, ?, ?)",
                           (row["Id"], query, int(row.get("ViewCount") or 0), row.get("AcceptedAnswerId")))
                counts["questions"] += 1
            elif row.get("PostTypeId") == "2":
                db.execute("INSERT INTO a VALUES (?, ?, ?, ?, ?)", (int(row["Id"]), row.get("ParentId"),
                           html_to_text(row.get("Body", "")), int(row.get("Score") or 0), row.get("OwnerUserId")))
        db.commit()
        counts["answers_without_question"] = db.execute(
            "SELECT COUNT(*) FROM a LEFT JOIN q ON a.parent = q.id WHERE q.id IS NULL").fetchone()[0]
        by_question: dict[str, list[tuple[int, str]]] = defaultdict(list)
        cursor = db.execute("SELECT a.id, a.parent, a.body, a.score, a.owner, q.query, q.views, q.accepted "
                            "FROM a JOIN q ON a.parent = q.id ORDER BY a.id")
        for answer_id, parent, body, score, owner, query, views, accepted in cursor:
            likes, dislikes = up[str(answer_id)], down[str(answer_id)]
            counts["score_mismatches"] += int(likes - dislikes != score)
            record = {"query": query, "response": body, "pv": views, "clicks": comments[str(answer_id)],
                      "likes": likes, "dislikes": dislikes, "accepted": int(accepted == str(answer_id)),
                      "score": score, "question_id": parent, "answer_id": str(answer_id)}
            if owner is not None:
                record["user_id"] = owner
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["answers"] += 1
            if pairs_out is not None:
                by_question[parent].append((score, body, query))
        db.close()
    if pairs_out is not None:
        for answers in by_question.values():
            for i, (score_i, body_i, query) in enumerate(answers):
                for score_j, body_j, _ in answers[i + 1:]:
                    if score_i == score_j:
                        continue
                    chosen, rejected = (body_i, body_j) if score_i > score_j else (body_j, body_i)
                    pairs_out.write(json.dumps({"prompt": query, "chosen": chosen, "rejected": rejected,
                                                "margin": abs(score_i - score_j)}, ensure_ascii=False) + "\n")
                    counts["pairs"] += 1
    return counts


def _conversation(turns: list[tuple[str, str]]) -> str:
    names = {"prompter": "User", "assistant": "Assistant"}
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{names.get(role, role)}: {text}" for role, text in turns)


def import_oasst(path: Path, out, pairs_out=None) -> dict:
    """One log row per assistant reply of OpenAssistant trees (tree or nested-message JSONL)."""
    path = Path(path)
    if not path.exists():
        raise RlhbError(f"{path}: no such file")
    counts = {"trees": 0, "assistant_replies": 0, "pairs": 0}

    def walk(message: dict, history: list[tuple[str, str]]) -> None:
        turns = history + [(message.get("role", ""), message.get("text", ""))]
        replies = message.get("replies") or []
        ranked = []
        for reply in replies:
            if reply.get("role") == "assistant":
                emojis = reply.get("emojis") or {}
                likes, dislikes = int(emojis.get("+1", 0)), int(emojis.get("-1", 0))
                out.write(json.dumps({
                    "query": _conversation(turns), "response": reply.get("text", ""),
                    "pv": max(int(reply.get("review_count") or 0), likes + dislikes), "clicks": 0,
                    "likes": likes, "dislikes": dislikes, "rank": reply.get("rank"),
                    "synthetic": int(bool(reply.get("synthetic"))), "message_id": reply.get("message_id"),
                }, ensure_ascii=False) + "\n")
                counts["assistant_replies"] += 1
                if reply.get("rank") is not None:
                    ranked.append((reply["rank"], reply.get("text", "")))
            walk(reply, turns)
        if pairs_out is not None:
            ranked.sort(key=lambda r: r[0])
            for i, (rank_i, text_i) in enumerate(ranked):
                for rank_j, text_j in ranked[i + 1:]:
                    if rank_i < rank_j:
                        pairs_out.write(json.dumps({"prompt": _conversation(turns), "chosen": text_i,
                                                    "rejected": text_j}, ensure_ascii=False) + "\n")
                        counts["pairs"] += 1

    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RlhbError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            root = record.get("prompt", record) if isinstance(record, dict) else None
            if not isinstance(root, dict) or "text" not in root:
                raise RlhbError(f"{path}:{number}: field 'prompt': not an OpenAssistant tree or message")
            counts["trees"] += 1
            walk(root, [])
    return counts
