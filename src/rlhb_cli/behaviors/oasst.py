"""OpenAssistant conversations into the log format: one row per assistant reply.

query = the conversation up to the reply, likes = "+1", dislikes = "-1", pv = max(review_count, likes +
dislikes) (anyone who reacted saw it), clicks = 0 (no such signal); ranked sibling replies make preference
pairs. Two shapes are read: trees (one tree or root message a line, replies nested, as oasst1's
`*.trees.jsonl`) and flat messages (one message a line naming its `parent_id`, as oasst1's
`*.messages.jsonl`), the shape decided by the file's first record. Flat messages are gathered into trees
in memory (oasst1 whole is ~90,000 messages), so a reply whose parent is missing, a cycle of replies or a
repeated message id can be found and written to the rejects, each line accounted for.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from rlhb_cli.errors import RlhbError
from rlhb_cli.prompts import conversation_query

if TYPE_CHECKING:
    from rlhb_cli.behaviors.importers import ImportLedger


class _BadTree(Exception):
    """A tree that cannot be read whole: rejected with this reason, none of its rows written."""


def _conversation(turns: list[tuple[str, str]]) -> str:
    """The log's query: the conversation so far, as every stage's prompt builder reads it back."""
    return conversation_query([{"role": "user" if role == "prompter" else "assistant", "content": text}
                               for role, text in turns])


def _reaction(emojis: dict, name: str, message_id) -> int:
    value = emojis.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadTree(f"message {message_id}: reaction {name!r} is {value!r}, not a count")
    return value


def _reply_row(reply: dict, turns: list[tuple[str, str]]) -> dict:
    emojis = reply.get("emojis") or {}
    if not isinstance(emojis, dict):
        raise _BadTree(f"message {reply.get('message_id')}: field 'emojis' is not a mapping")
    likes = _reaction(emojis, "+1", reply.get("message_id"))
    dislikes = _reaction(emojis, "-1", reply.get("message_id"))
    reviews = reply.get("review_count") or 0
    if isinstance(reviews, bool) or not isinstance(reviews, int):
        raise _BadTree(f"message {reply.get('message_id')}: review_count {reviews!r} is not a count")
    return {"query": _conversation(turns), "response": reply.get("text", ""),
            "pv": max(reviews, likes + dislikes), "clicks": 0, "likes": likes, "dislikes": dislikes,
            "rank": reply.get("rank"), "synthetic": int(bool(reply.get("synthetic"))),
            "message_id": reply.get("message_id")}


def walk(message: dict, history: list[tuple[str, str]], rows: list[dict], pairs: list[dict]) -> int:
    """The messages of the tree below `message`, itself included; its rows and pairs appended."""
    if not isinstance(message.get("text", ""), str):
        raise _BadTree(f"message {message.get('message_id')}: field 'text' is not text")
    if message.get("role") not in ("prompter", "assistant"):
        raise _BadTree(f"message {message.get('message_id')}: field 'role' is {message.get('role')!r}, neither "
                       f"prompter nor assistant")
    turns = history + [(message["role"], message.get("text", ""))]
    seen = 1
    replies = message.get("replies") or []
    if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
        raise _BadTree(f"message {message.get('message_id')}: field 'replies' is not a list of messages")
    ranked = []
    for reply in replies:
        if reply.get("role") == "assistant":
            if message["role"] != "prompter":
                raise _BadTree(f"message {reply.get('message_id')}: an assistant reply to an assistant message")
            rows.append(_reply_row(reply, turns))
            if isinstance(reply.get("rank"), (int, float)) and not isinstance(reply.get("rank"), bool):
                ranked.append((reply["rank"], reply.get("text", "")))
        seen += walk(reply, turns, rows, pairs)
    ranked.sort(key=lambda r: r[0])
    messages = [{"role": "user" if role == "prompter" else "assistant", "content": text} for role, text in turns]
    for i, (rank_i, text_i) in enumerate(ranked):
        for rank_j, text_j in ranked[i + 1:]:
            if rank_i < rank_j:  # the conversation as turns too: train-dpo reads `messages`
                pairs.append({"prompt": _conversation(turns), "messages": messages, "chosen": text_i,
                              "rejected": text_j})
    return seen


def _records(path: Path, ledger: "ImportLedger") -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-empty line; text that is not UTF-8 JSON is refused in one line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                hint = " (it looks like UTF-16: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                raise RlhbError(f"{path}:{number}: not UTF-8 text{hint}") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RlhbError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                ledger.reject(f"line {number}", "nested deeper than a JSON reader may go")


def _is_flat(record: object) -> bool:
    return isinstance(record, dict) and "parent_id" in record and "replies" not in record and "prompt" not in record


def _trees_of_flat(path: Path, first: tuple[int, dict], records, ledger: "ImportLedger"):
    """The flat messages gathered into nested trees: [(root's line, tree, {message id: line})]; every line that
    joins no tree is in the ledger (missing parent, cycle, repeated id, not a message)."""
    line_of: dict[str, int] = {}
    message_of: dict[str, dict] = {}
    for number, record in [first, *records]:
        if not _is_flat(record):
            ledger.reject(f"line {number}", "not a flat message (no 'parent_id', or nested 'replies') in a file of "
                                            "flat messages")
            continue
        message_id = record.get("message_id")
        if not isinstance(message_id, str) or not message_id:
            ledger.reject(f"line {number}", f"field 'message_id' is {message_id!r}, not an id")
        elif message_id in line_of:
            ledger.reject(f"line {number}", f"message {message_id} appears again (line {line_of[message_id]} is "
                                            f"kept)", "duplicate")
        else:
            line_of[message_id], message_of[message_id] = number, record
    children: dict[str, list[str]] = {}
    for message_id, record in message_of.items():
        if record["parent_id"] is not None:
            children.setdefault(record["parent_id"], []).append(message_id)
    trees = []
    placed: set[str] = set()
    for root_id, root in message_of.items():
        if root["parent_id"] is not None:
            continue
        members, stack, nested = {}, [root_id], {}
        while stack:  # iterative: a conversation may be deeper than Python recurses
            current = stack.pop()
            members[current] = line_of[current]
            nested[current] = {**message_of[current], "replies": []}
            stack.extend(reversed(children.get(current, [])))
        for message_id in members:
            parent = message_of[message_id]["parent_id"]
            if parent is not None:
                nested[parent]["replies"].append(nested[message_id])
        placed.update(members)
        trees.append((line_of[root_id], nested[root_id], members))
    for message_id, record in message_of.items():
        if message_id in placed:
            continue
        chain, current = [message_id], record["parent_id"]
        on_chain = {message_id}
        while current in message_of and current not in on_chain:
            chain.append(current)
            on_chain.add(current)
            current = message_of[current]["parent_id"]
        reason = (f"its parent {record['parent_id']} is not among the file's messages" if chain == [message_id] and current not in message_of
                  else f"under message {chain[-1]}, whose parent {current} is not among the file's messages" if current not in message_of
                  else "in or under a cycle of replies (no root prompt above it)")
        ledger.reject(f"line {line_of[message_id]}", f"message {message_id}: {reason}")
    return trees


def _nested_trees(path: Path, records) -> Iterator[tuple[int, dict, None]]:
    """Each line's tree, streamed: one tree in memory at a time."""
    for number, record in records:
        root = record.get("prompt", record) if isinstance(record, dict) else None
        if not isinstance(root, dict) or "text" not in root:
            raise RlhbError(f"{path}:{number}: field 'prompt': not an OpenAssistant tree or message")
        yield number, root, None


def import_oasst(path: Path, out, pairs_out, ledger: "ImportLedger") -> dict:
    """One log row per assistant reply of OpenAssistant trees or flat messages (see the module), every
    message counted; pairs of ranked sibling replies with their conversation as text and as turns
    (`messages`, what train-dpo reads). A tree that cannot be read whole (replies that are no list, a
    message without a role, a reaction that is no count, nesting too deep) goes to `ledger` with its line
    (flat: each of its messages' lines); a file that is not UTF-8 JSON lines is refused in one line."""
    path = Path(path)
    if not path.exists():
        raise RlhbError(f"{path}: no such file")
    if path.is_dir():
        raise RlhbError(f"{path}: is a directory; give the trees' .jsonl file")
    counts = {"trees": 0, "messages": 0, "assistant_replies": 0, "pairs": 0}
    records = _records(path, ledger)
    first = next(records, None)
    if first is not None and _is_flat(first[1]):
        counts["format"] = "messages"
        trees = _trees_of_flat(path, first, records, ledger)
    else:
        counts["format"] = "trees"
        trees = _nested_trees(path, itertools.chain([first] if first else [], records))
    for number, root, members in trees:
        rows: list[dict] = []
        pairs: list[dict] = []
        try:
            messages = walk(root, [], rows, pairs)
        except (_BadTree, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, _BadTree) else "a conversation nested deeper than can be walked"
            for where in ([f"line {number}"] if members is None else [f"line {n}" for n in members.values()]):
                ledger.reject(where, reason if members is None else f"in the tree of line {number}: {reason}")
            continue
        counts["trees"] += 1
        counts["messages"] += messages
        tree_id = root.get("message_id") or f"line {number}"  # a tree's rows split together (--group-field tree)
        counts["assistant_replies"] += len(rows)
        for row in rows:
            out.write(json.dumps(row | {"tree": tree_id}, ensure_ascii=False) + "\n")
        if pairs_out is not None:
            for pair in pairs:
                pairs_out.write(json.dumps(pair, ensure_ascii=False) + "\n")
            counts["pairs"] += len(pairs)
    counts["rejected"], counts["duplicate"] = ledger.count("rejected"), ledger.count("duplicate")
    return counts
