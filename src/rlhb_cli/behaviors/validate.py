"""Judging every parsed row: a kept row is sound; a rejected one is written down with its reason.

Checks run column-wise over the whole table; only the rows that fail are visited one by one, to word
their reason. Impression events are checked as events, then aggregated per (query, response, window).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhb_cli.behaviors.read import (COUNT_FIELDS, EVENT_FLAGS, KNOWN_OPTIONAL, TEXT_FIELDS, ParsedLogs, Rejected,
                                     kind_of, text_column, to_numbers)
from rlhb_cli.errors import RlhbError


@dataclass
class ValidatedLogs:
    table: pa.Table  # query, response, pv, clicks, likes, dislikes (int64), source_line, and optional columns
    kind: str  # aggregated | events
    rows_in: int
    rows_kept: int
    rejected: list[Rejected]
    duplicates: list[Rejected]
    dropped_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Verdicts:
    """First failing check wins; each row keeps one reason."""

    def __init__(self, rows: int):
        self.ok = np.ones(rows, dtype=bool)
        self.reason: dict[int, str] = {}
        self.field: dict[int, str | None] = {}

    def flag(self, mask: np.ndarray, name: str | None, message) -> None:
        for i in np.flatnonzero(mask & self.ok):
            self.reason[int(i)] = message(i) if callable(message) else message
            self.field[int(i)] = name
            self.ok[i] = False



def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def detect_kind(table: pa.Table, kind: str, path: Path, absent_as_zero: list[str]) -> str:
    names = set(table.column_names)
    if kind in ("aggregated", "events"):
        return kind
    if all(f in names or f in absent_as_zero for f in COUNT_FIELDS):
        return "aggregated"
    if any(f in names for f in EVENT_FLAGS):
        return "events"
    raise RlhbError(
        f"{path}: no behaviour columns; need pv, clicks, likes, dislikes (aggregated rows) or viewed, clicked, liked, "
        f"disliked (impression events); found {', '.join(sorted(names)) or 'none'}; map yours with --field likes=NAME"
    )


def validate(parsed: ParsedLogs, path: Path, kind: str = "auto", max_count: float = 1e10,
             require_view: bool = True, keep_fields: list[str] | None = None,
             absent_as_zero: list[str] | None = None, salt: str = "", group_field: str = "") -> ValidatedLogs:
    table = parsed.table
    absent_as_zero = list(absent_as_zero or [])
    keep_fields = list(keep_fields or [])
    n = table.num_rows
    rows_in = n + len(parsed.rejected)
    kind = detect_kind(table, kind, path, absent_as_zero)
    notes: list[str] = []
    for name in TEXT_FIELDS:
        if name not in table.column_names:
            raise RlhbError(f"{path}: no column '{name}' (columns: {', '.join(table.column_names)}); "
                            f"map yours with --field {name}=NAME")
    for name in keep_fields:
        if name not in table.column_names:
            raise RlhbError(f"{path}: --keep-field {name}: no such column (columns: {', '.join(table.column_names)})")
    counted = list(COUNT_FIELDS) if kind == "aggregated" else list(EVENT_FLAGS)
    for name in counted:
        if name not in table.column_names:
            if name in absent_as_zero:
                notes.append(f"column '{name}' is absent; taken as 0 for every row (--absent-as-zero)")
                continue
            if kind == "events":
                notes.append(f"column '{name}' is absent; no event has it")
                continue
            raise RlhbError(f"{path}: no column '{name}' (columns: {', '.join(table.column_names)}); map yours with "
                            f"--field {name}=NAME, or take it as 0 with --absent-as-zero {name}")

    verdicts = _Verdicts(n)
    texts = {}
    for name in TEXT_FIELDS:
        column, missing, not_text = text_column(parsed, name)
        verdicts.flag(missing, name, f"missing field '{name}'")
        verdicts.flag(not_text, name, f"field '{name}' must be text, got {kind_of(parsed, name)}")
        verdicts.flag(_blank(column), name, f"field '{name}' is empty")
        texts[name] = column

    counts: dict[str, np.ndarray] = {}
    for name in counted:
        if name not in table.column_names:
            counts[name] = np.zeros(n)
            continue
        column = table.column(name)
        if kind == "events" and (pa.types.is_boolean(column.type)):
            column = column.cast(pa.int64())
        elif kind == "events" and pa.types.is_string(column.type):
            column = pc.replace_substring_regex(pc.replace_substring_regex(column, "^true$", "1"), "^false$", "0")
        values, missing, not_number = to_numbers(column)
        raw = column.to_pylist() if not_number.any() else None
        verdicts.flag(missing, name, f"missing field '{name}'")
        verdicts.flag(not_number, name, lambda i, name=name, raw=raw: f"field '{name}' is not a number: {raw[i]!r}")
        verdicts.flag(values < 0, name, lambda i, name=name, v=values: f"field '{name}' is negative ({_fmt(v[i])})")
        verdicts.flag(values != np.floor(values), name,
                      lambda i, name=name, v=values: f"field '{name}' is not a whole count ({_fmt(v[i])})")
        if kind == "events":
            verdicts.flag(values > 1, name, lambda i, name=name, v=values: f"field '{name}' must be 0 or 1 ({_fmt(v[i])})")
        else:
            verdicts.flag(values > max_count, name, lambda i, name=name, v=values:
                          f"field '{name}' is absurdly large ({_fmt(v[i])} > max_count {_fmt(max_count)})")
        counts[EVENT_FLAGS.get(name, name)] = values

    if require_view and kind == "aggregated":
        pv = counts["pv"]
        for name in ("clicks", "likes", "dislikes"):
            verdicts.flag(counts[name] > pv, name, lambda i, name=name:
                          f"{name} ({_fmt(counts[name][i])}) > pv ({_fmt(pv[i])}): it needs a view")
        reactions = counts["likes"] + counts["dislikes"]
        verdicts.flag(reactions > pv, "likes", lambda i: f"likes + dislikes ({_fmt(reactions[i])}) > pv ({_fmt(pv[i])}): "
                                                          f"each reaction needs a view")
    if kind == "events":
        viewed = counts["pv"] > 0
        for name, flag_name in (("clicks", "clicked"), ("likes", "liked"), ("dislikes", "disliked")):
            verdicts.flag((counts[name] > 0) & ~viewed, flag_name, f"{flag_name} without viewed: it needs a view")
        verdicts.flag((counts["likes"] > 0) & (counts["dislikes"] > 0), "liked", "both liked and disliked")

    # Duplicates among otherwise sound rows: same key as an earlier row.
    # (rows of two groups, e.g. two conversations, are two sessions: never one another's duplicate)
    key_names = ["event_id"] if kind == "events" else ["query", "response"] + [
        k for k in ("window", "user_segment", "user_id", group_field) if k and k in table.column_names]
    duplicates: list[Rejected] = []
    ok = verdicts.ok.copy()
    if kind == "events" and "event_id" not in table.column_names:
        notes.append("events carry no event_id column, so repeated events cannot be told apart from real ones")
    else:
        key_columns = [texts[k] if k in texts else table.column(k).cast(pa.string()) for k in key_names]
        first_row = _first_occurrence(key_columns, ok)
        repeated = ok & (first_row != np.arange(n))
        for r, f in zip(np.flatnonzero(repeated), first_row[repeated]):
            key = {k: _short(texts[k][r].as_py() if k in texts else table.column(k)[r].as_py()) for k in key_names}
            if key.get("user_id") is not None:  # the ledger holds what the data set holds: the hash, never the id
                key["user_id"] = _hashed(table.column("user_id").cast(pa.string())[r].as_py(), salt)
            duplicates.append(Rejected(int(parsed.lines[r]), f"duplicate of line {int(parsed.lines[f])}", None, key))
            ok[r] = False

    def raw_of(i: int) -> dict:
        return {k: _short(table.column(k)[i].as_py()) for k in list(TEXT_FIELDS) + [c for c in counted if c in table.column_names]}

    rejected = parsed.rejected + [Rejected(int(parsed.lines[i]), verdicts.reason[i], verdicts.field[i], raw_of(i))
                                  for i in sorted(verdicts.reason)]
    rejected.sort(key=lambda r: r.line)
    duplicates.sort(key=lambda r: r.line)
    everything = bool(ok.all())  # the usual case: no copy of a million texts to keep them all
    keep = pa.array(ok)

    def kept_rows(column):
        return column if everything else column.filter(keep)

    columns = {"query": kept_rows(texts["query"]), "response": kept_rows(texts["response"])}
    for name in COUNT_FIELDS:
        columns[name] = pa.array(counts[name][ok].astype(np.int64))
    columns["source_line"] = pa.array(parsed.lines[ok].astype(np.int64))
    optional = [k for k in ("window", "user_segment", "user_id") if k in table.column_names]
    for name in optional + keep_fields:
        columns[name] = kept_rows(table.column(name)).cast(pa.string())
    kept = pa.table(columns)
    rows_kept = kept.num_rows
    known = set(TEXT_FIELDS) | set(counted) | set(KNOWN_OPTIONAL) | set(keep_fields)
    dropped = sorted(c for c in table.column_names if c not in known)
    if kind == "events":
        kept = _aggregate_events(kept, notes)
        if "event_id" in table.column_names:
            dropped.append("event_id")
    if "user_id" in kept.column_names:
        kept = kept.set_column(kept.column_names.index("user_id"), "user_id", _anonymise(kept.column("user_id"), salt))
        notes.append("user_id replaced by a salted hash")
    return ValidatedLogs(kept, kind, rows_in, rows_kept, rejected, duplicates, dropped, notes)


def _blank(column: pa.Array) -> np.ndarray:
    """Empty or whitespace-only strings. Only strings that start with white space (or are empty) can be
    blank, so only those few are trimmed, instead of copying every text."""
    first = pc.utf8_slice_codeunits(column, 0, 1)
    maybe = pc.or_(pc.equal(first, ""), pc.utf8_is_space(first)).fill_null(False).to_numpy(zero_copy_only=False)
    blank = np.zeros(len(column), dtype=bool)
    if maybe.any():
        candidates = np.flatnonzero(maybe)
        trimmed = pc.utf8_trim_whitespace(column.take(pa.array(candidates)))
        blank[candidates] = pc.equal(pc.utf8_length(trimmed), 0).fill_null(False).to_numpy(zero_copy_only=False)
    return blank


def _first_occurrence(key_columns: list, usable: np.ndarray) -> np.ndarray:
    """For each row, the index of the first usable row with the same key (itself if it is the first).

    A 64-bit hash of each row's key (polars, multi-threaded) finds the few rows that may repeat another;
    only those are compared exactly (`_first_by_codes`), so a log of distinct rows is never
    dictionary-encoded whole. No Python loop over rows.
    """
    # deferred: polars (0.2 s to import) is needed by prepare-behaviors only
    import polars

    n = len(usable)
    first = np.arange(n)
    rows = np.flatnonzero(usable)
    if len(rows) < 2:
        return first
    keys = polars.from_arrow(pa.table({str(i): column for i, column in enumerate(key_columns)}))
    hashes = keys.hash_rows(seed=0).to_numpy()[rows]
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    if not same.any():
        return first
    maybe = np.zeros(len(rows), dtype=bool)
    maybe[order[1:][same]] = True
    maybe[order[:-1][same]] = True
    candidates = rows[maybe]
    picked = pa.array(candidates)
    first[candidates] = candidates[_first_by_codes([column.take(picked) for column in key_columns])]
    return first


def _first_by_codes(key_columns: list) -> np.ndarray:
    """For each row, the index of the first row with the same key, exactly: each key column is dictionary-
    encoded to integers and the codes folded into one integer key; a stable sort then groups equal keys
    with the earliest row first."""
    n = len(key_columns[0])
    combined = np.zeros(n, dtype=np.int64)
    span = 1
    for column in key_columns:
        encoded = (column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column).dictionary_encode()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
        size = len(encoded.dictionary) + 1
        if span * size >= 2**62:  # re-number densely before the folded key could overflow
            _, combined = np.unique(combined, return_inverse=True)
            span = int(combined.max()) + 1
        combined = combined * size + codes
        span *= size
    order = np.argsort(combined, kind="stable")
    keys = combined[order]
    starts = np.concatenate([[True], keys[1:] != keys[:-1]])
    first = np.empty(n, dtype=np.int64)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


def _short(value, limit: int = 200):
    """A value as the rejects ledger shows it: JSON's own types, long text cut (bytes, decimals and times
    from Parquet as their text)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _hashed(identifier: str, salt: str) -> str:
    return hashlib.sha256((salt + identifier).encode()).hexdigest()[:16]


def _anonymise(column: pa.ChunkedArray, salt: str) -> pa.Array:
    """Each distinct identifier becomes sha256(salt + id)[:16]; the same id always maps to the same hash."""
    encoded = column.combine_chunks().dictionary_encode()
    hashed = [None if v is None else _hashed(v, salt)
              for v in encoded.dictionary.to_pylist()]
    return pa.DictionaryArray.from_arrays(encoded.indices, pa.array(hashed, pa.string())).cast(pa.string())


def _aggregate_events(events: pa.Table, notes: list[str]) -> pa.Table:
    """Sum impression events per (query, response[, window]): pv = viewed events, and so on."""
    keys = ["query", "response"] + (["window"] if "window" in events.column_names else [])
    aggregations = [(m, "sum") for m in COUNT_FIELDS] + [("source_line", "min"), ("source_line", "count")]
    if "user_id" in events.column_names:
        aggregations.append(("user_id", "count_distinct"))
    grouped = events.group_by(keys, use_threads=False).aggregate(aggregations)
    rename = {f"{m}_sum": m for m in COUNT_FIELDS} | {"source_line_min": "source_line", "source_line_count": "events",
                                                       "user_id_count_distinct": "users"}
    grouped = grouped.rename_columns([rename.get(c, c) for c in grouped.column_names])
    if "user_segment" in events.column_names:
        notes.append("user_segment aggregated over: each row sums all segments")
    notes.append(f"{events.num_rows} events aggregated into {grouped.num_rows} rows")
    return grouped.sort_by([("source_line", "ascending")])
