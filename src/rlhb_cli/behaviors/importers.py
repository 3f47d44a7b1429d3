"""Real public behaviour data into the log format: Stack Exchange dumps here, OpenAssistant in oasst.py.

Stack Exchange (one row per answer): query = question title + body, response = answer body (HTML to
plain text), pv = the question's ViewCount (shared by sibling answers), likes = upvotes, dislikes =
downvotes (Votes.xml types 2 and 3), clicks = comments on the answer (Comments.xml; the dump has no
clicks, comments are the nearest proxy). The XML is streamed and questions are kept in a temporary
SQLite table, so a multi-GB dump runs in bounded memory.

Both sources can write the preference pairs they imply (`--pairs`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, Optional

from rlhb_cli import rundir, storage
from rlhb_cli.behaviors.oasst import import_oasst
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


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Stream the <row .../> elements of a Stack Exchange XML file (with their ordinal), each dropped from the tree
    once read: the root is emptied as it goes, so memory does not grow with the file."""
    if not path.exists():
        raise RlhbError(f"{path}: no such file (a Stack Exchange dump folder holds Posts.xml, Votes.xml, Comments.xml)")
    if path.is_dir():
        raise RlhbError(f"{path}: is a directory, not a Stack Exchange XML file")
    number, root = 0, None
    try:
        for event, element in ET.iterparse(path, events=("start", "end")):
            if root is None:
                root = element
            elif event == "end" and element.tag == "row":
                number += 1
                yield number, dict(element.attrib)
                root.clear()  # the rows read so far, cleared or not, would otherwise stay the root's children
    except ET.ParseError as exc:
        raise RlhbError(f"{path}:{exc.position[0]}: not well-formed XML ({exc})") from None


class ImportLedger:
    """The rows an import could not use, each with where it was and why: written beside the log."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def reject(self, where: str, reason: str, kind: str = "rejected") -> None:
        self.rows.append({"where": where, "reason": reason, "kind": kind})

    def count(self, kind: str) -> int:
        return sum(row["kind"] == kind for row in self.rows)


def _whole(row: dict, name: str) -> int:
    """A whole number from an XML attribute (absent is 0), or ValueError naming the field."""
    value = (row.get(name) or "0").strip()
    if not value.lstrip("-").isdigit():
        raise ValueError(f"{name} {value[:40]!r} is not a whole number")
    return int(value)


def site_of(dump: Path) -> str:
    """A dump's site name: its folder's name less a leading "stackexchange-" (cardano for stackexchange-cardano)."""
    name = Path(os.path.abspath(dump)).name  # not resolved: a linked folder is named by its link
    return name[len("stackexchange-"):] if name.startswith("stackexchange-") else name


def parse_since(value: str | None) -> str | None:
    """--since YYYY-MM-DD (or a full ISO time) -> the ISO prefix dumps' CreationDate compares with as text."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).isoformat(timespec="milliseconds")
    except ValueError:
        raise RlhbError(f"--since {value!r}: give a date as YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS)") from None


def _counts_table(db: sqlite3.Connection, table: str, rows: Iterator[tuple[int, dict]], where_file: str,
                  ledger: ImportLedger, column_of) -> int:
    """Count per post, into SQLite (memory stays bounded), the rows for which `column_of(row)` names a column
    (up / down for votes, n for comments); returns the rows read."""
    db.execute(f"CREATE TABLE {table} (post INTEGER PRIMARY KEY, up INTEGER DEFAULT 0, down INTEGER DEFAULT 0, "
               f"n INTEGER DEFAULT 0)")
    batches: dict[str, list[tuple[int]]] = defaultdict(list)

    def flush(column: str) -> None:
        db.executemany(f"INSERT INTO {table} (post, {column}) VALUES (?, 1) ON CONFLICT(post) DO UPDATE SET "
                       f"{column} = {column} + 1", batches.pop(column, []))

    read = 0
    for number, row in rows:
        read += 1
        column = column_of(row)
        if column is None:
            continue
        post = (row.get("PostId") or "").strip()
        if not post.isdigit():
            what = "vote" if table == "votes" else "comment"
            ledger.reject(f"{where_file} row {number}", f"a {what} without PostId" if not post
                          else f"a {what} whose PostId {post[:40]!r} is not a post id")
            continue
        batches[column].append((int(post),))
        if len(batches[column]) >= 50_000:
            flush(column)
    for column in list(batches):
        flush(column)
    return read


def import_stackexchange(dumps, out, pairs_out=None, ledger: ImportLedger | None = None, min_views: int = 0,
                         since: str | None = None) -> dict:
    """Write one log row per answer of each dump to `out` (a text stream), each with its `site`; return
    counts. Rows that cannot be used (a vote without a post, a count that is no number, a post id seen
    before) go to `ledger`; answers under --min-views or older than --since are counted as filtered. Votes,
    comments and posts are held in a temporary SQLite file, so memory stays bounded whatever the dumps' size."""
    dumps = [Path(d) for d in ([dumps] if isinstance(dumps, (str, Path)) else dumps)]
    ledger = ledger if ledger is not None else ImportLedger()
    counts = {"sites": [], "questions": 0, "answers": 0, "answers_without_question": 0, "pairs": 0,
              "score_mismatches": 0, "posts_in": 0, "votes_in": 0, "filtered_min_views": 0, "filtered_since": 0}
    for dump in dumps:
        if not dump.is_dir():
            raise RlhbError(f"{dump}: not a folder (a Stack Exchange dump folder holds Posts.xml, Votes.xml, "
                            f"Comments.xml)")
    sites = [site_of(d) for d in dumps]
    if len(set(sites)) < len(sites):
        raise RlhbError(f"{', '.join(map(str, dumps))}: two dumps of one site ({sites}); give each site once")
    for dump, site in zip(dumps, sites):
        with tempfile.TemporaryDirectory() as tmp:
            db = sqlite3.connect(Path(tmp) / "posts.sqlite")
            _import_site(db, dump, site, out, pairs_out, ledger, counts, min_views, since)
            db.close()
        counts["sites"].append(site)
    counts["rejected"], counts["duplicate"] = ledger.count("rejected"), ledger.count("duplicate")
    return counts


def _import_site(db, dump: Path, site: str, out, pairs_out, ledger: ImportLedger, counts: dict, min_views: int,
                 since: str | None) -> None:
    prefix = f"{dump.name}/"
    counts["votes_in"] += _counts_table(db, "votes", _rows(dump / "Votes.xml"), prefix + "Votes.xml", ledger,
                                        lambda row: {"2": "up", "3": "down"}.get(row.get("VoteTypeId")))
    comments_path = dump / "Comments.xml"
    _counts_table(db, "comments", _rows(comments_path) if comments_path.exists() else iter(()),
                  prefix + "Comments.xml", ledger, lambda row: "n")
    db.execute("CREATE TABLE ids (id INTEGER PRIMARY KEY)")  # every post id seen: a second one is a duplicate
    db.execute("CREATE TABLE q (id TEXT PRIMARY KEY, query TEXT, views INTEGER, accepted TEXT)")
    db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, parent TEXT, body TEXT, score INTEGER, owner TEXT, "
               "created TEXT)")
    for number, row in _rows(dump / "Posts.xml"):
        counts["posts_in"] += 1
        where = f"{prefix}Posts.xml row {number}" + (f" (Id {row['Id'][:20]})" if row.get("Id") else "")
        kind, post_id = row.get("PostTypeId"), (row.get("Id") or "").strip()
        if kind not in ("1", "2"):
            continue  # wiki, tag excerpts and the like: not questions or answers (counted in posts_in)
        if not post_id.isdigit():
            ledger.reject(where, f"Id {post_id[:40]!r} is not a post id")
            continue
        if db.execute("SELECT 1 FROM ids WHERE id = ?", (int(post_id),)).fetchone():
            ledger.reject(where, f"post Id {post_id} appears again (the first one is kept)", "duplicate")
            continue
        try:
            if kind == "1":
                query = (row.get("Title", "").strip() + "\n\n" + html_to_text(row.get("Body", ""))).strip()
                db.execute("INSERT INTO q VALUES (?, ?, ?, ?)",
                           (post_id, query, _whole(row, "ViewCount"), row.get("AcceptedAnswerId")))
                counts["questions"] += 1
            else:
                db.execute("INSERT INTO a VALUES (?, ?, ?, ?, ?, ?)", (int(post_id), row.get("ParentId"),
                           html_to_text(row.get("Body", "")), _whole(row, "Score"), row.get("OwnerUserId"),
                           row.get("CreationDate") or ""))
        except ValueError as exc:
            ledger.reject(where, str(exc))
            continue
        db.execute("INSERT INTO ids VALUES (?)", (int(post_id),))
    db.commit()
    counts["answers_without_question"] += db.execute(
        "SELECT COUNT(*) FROM a LEFT JOIN q ON a.parent = q.id WHERE q.id IS NULL").fetchone()[0]
    cursor = db.execute(
        "SELECT a.id, a.parent, a.body, a.score, a.owner, a.created, q.query, q.views, q.accepted, "
        "COALESCE(v.up, 0), COALESCE(v.down, 0), COALESCE(c.n, 0) FROM a JOIN q ON a.parent = q.id "
        "LEFT JOIN votes v ON v.post = a.id LEFT JOIN comments c ON c.post = a.id ORDER BY a.parent, a.id")
    group: list[tuple[int, str, str]] = []  # one question's answers, for its pairs: the cursor is by question
    parent_of_group = None
    for answer_id, parent, body, score, owner, created, query, views, accepted, likes, dislikes, n_comments in cursor:
        if views < min_views:
            counts["filtered_min_views"] += 1
            continue
        if since is not None and created[:len(since)] < since:
            counts["filtered_since"] += 1
            continue
        counts["score_mismatches"] += int(likes - dislikes != score)
        record = {"query": query, "response": body, "pv": views, "clicks": n_comments, "likes": likes,
                  "dislikes": dislikes, "accepted": int(accepted == str(answer_id)), "score": score,
                  "site": site, "question_id": parent, "answer_id": str(answer_id)}
        if owner is not None:
            record["user_id"] = f"{site}:{owner}"  # an account is one site's: the same number elsewhere is another person
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts["answers"] += 1
        if pairs_out is not None:
            if parent != parent_of_group:
                counts["pairs"] += _write_pairs(group, pairs_out)
                group, parent_of_group = [], parent
            group.append((score, body, query))
    if pairs_out is not None:
        counts["pairs"] += _write_pairs(group, pairs_out)


def _write_pairs(answers: list[tuple[int, str, str]], pairs_out) -> int:
    """Every two answers of one question with different scores, the higher chosen; returns how many."""
    written = 0
    for i, (score_i, body_i, query) in enumerate(answers):
        for score_j, body_j, _ in answers[i + 1:]:
            if score_i == score_j:
                continue
            chosen, rejected = (body_i, body_j) if score_i > score_j else (body_j, body_i)
            pairs_out.write(json.dumps({"prompt": query, "chosen": chosen, "rejected": rejected,
                                        "margin": abs(score_i - score_j)}, ensure_ascii=False) + "\n")
            written += 1
    return written


@dataclass
class ImportConfig:
    """What an import read and wrote (its manifest's config)."""

    source: list[str]
    out: str
    pairs: Optional[str]
    min_views: int = 0
    since: Optional[str] = None


def import_logs(kind: str, sources, out: Path, pairs: Path | None, min_views: int = 0,
                since: str | None = None) -> tuple[dict, Path, int]:
    """`rlhb import KIND`: the dump(s) at `sources` into the log file `out` (and preference `pairs`), with its
    manifest and rejects ledger beside it, written whole or not at all; (counts, ledger path, rows rejected)."""
    sources = [Path(p) for p in ([sources] if isinstance(sources, (str, Path)) else sources)]
    if kind != "stackexchange" and (len(sources) != 1 or min_views or since):
        raise RlhbError(f"import {kind}: one file at a time, without --min-views or --since (Stack Exchange's)")
    since_iso = parse_since(since)
    config = ImportConfig([str(p) for p in sources], str(out), str(pairs) if pairs else None, min_views, since)
    out.parent.mkdir(parents=True, exist_ok=True)
    with rundir.open_stage(out.parent, f"import-{kind}", config, None, manifest_name=f"{out.name}.manifest.json") as stage:
        tmp_out = out.with_name(f".{out.name}.tmp")
        tmp_pairs = pairs.with_name(f".{pairs.name}.tmp") if pairs else None
        ledger = ImportLedger()
        rejects = out.with_name(f"{out.name}.rejected.jsonl")
        try:
            with open(tmp_out, "w", encoding="utf-8") as handle, \
                    (open(tmp_pairs, "w", encoding="utf-8") if tmp_pairs else nullcontext()) as pairs_handle:
                if kind == "stackexchange":
                    counts = import_stackexchange(sources, handle, pairs_handle, ledger, min_views, since_iso)
                    for source in sources:
                        for name in ("Posts.xml", "Votes.xml", "Comments.xml"):
                            if (source / name).exists():
                                stage.add_input(name if len(sources) == 1 else f"{site_of(source)}/{name}",
                                                source / name)
                else:
                    counts = import_oasst(sources[0], handle, pairs_handle, ledger)
                    stage.add_input("trees", sources[0])
            storage.atomic_write_text(rejects, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ledger.rows))
            tmp_out.replace(out)
            if tmp_pairs:
                tmp_pairs.replace(pairs)
        finally:  # a failed import leaves nothing behind but its failed manifest
            for tmp in (tmp_out, tmp_pairs):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
        stage.outputs = (out.name, rejects.name) + (
            (pairs.name,) if pairs and pairs.resolve().parent == out.resolve().parent else ())
        stage.set_summary(counts)
    return counts, rejects, len(ledger.rows)
