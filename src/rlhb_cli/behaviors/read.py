"""Reading behaviour logs: JSONL, CSV or Parquet (gzip too), aggregated rows or impression events.

The reader never drops a row silently. It returns an Arrow table of the rows it could parse, each with
its line number, and a list of rows it could not parse with the reason; `validate` then judges every
parsed row with vectorised Arrow/numpy work (no Python loop per row on the fast path).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pj
import pyarrow.parquet as pq

from rlhb_cli.errors import RlhbError

TEXT_FIELDS = ("query", "response")
COUNT_FIELDS = ("pv", "clicks", "likes", "dislikes")
EVENT_FLAGS = {"viewed": "pv", "clicked": "clicks", "liked": "likes", "disliked": "dislikes"}
KNOWN_OPTIONAL = ("window", "user_segment", "user_id", "event_id")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_NUMBER = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"
_BOM = b"\xef\xbb\xbf"
MAX_DEPTH = 64  # a log row is flat; deeper input is read line by line, where nesting is refused per line


@dataclass
class Rejected:
    line: int
    reason: str
    field: str | None = None
    raw: dict | None = None

    def to_json(self) -> dict:
        out = {"line": self.line, "field": self.field, "reason": self.reason}
        if self.raw is not None:
            out["raw"] = self.raw
        return out


@dataclass
class ParsedLogs:
    table: pa.Table  # columns renamed to canonical names; every value as read
    lines: np.ndarray  # line (or row) number of each table row in the user's file, 1-based
    rejected: list[Rejected] = field(default_factory=list)
    format: str = "jsonl"
    was_number: dict[str, np.ndarray] = field(default_factory=dict)  # slow JSONL path: value was a JSON number


def detect_format(path: Path) -> tuple[str, bool]:
    """(format, gzipped) from the file name; an unknown extension is refused."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] in (".gz", ".gzip")
    ext = suffixes[-2] if gzipped and len(suffixes) > 1 else (suffixes[-1] if suffixes and not gzipped else "")
    if ext not in FORMATS:
        shown = "".join(path.suffixes) or "(none)"
        raise RlhbError(f"{path}: unknown extension {shown}; use .jsonl, .csv or .parquet (optionally .gz)")
    return FORMATS[ext], gzipped


def _load_bytes(path: Path, gzipped: bool) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RlhbError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RlhbError(f"{path}: is a directory, not a log file") from None
    if gzipped:
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise RlhbError(f"{path}: truncated gzip stream (the file ends before the compressed data does)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise RlhbError(f"{path}: not a valid gzip file ({exc})") from None
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data or data.isspace():  # isspace stops at the first other byte; strip would copy the file
        raise RlhbError(f"{path}: empty file, no rows to read")
    return data


def read_logs(path: Path, field_map: dict[str, str] | None = None) -> ParsedLogs:
    """Parse a log file into an Arrow table with canonical column names (after `field_map`)."""
    path = Path(path)
    fmt, gzipped = detect_format(path)
    if fmt == "parquet":
        if gzipped:
            raise RlhbError(f"{path}: Parquet is compressed inside; give the .parquet file itself")
        if not path.exists():
            raise RlhbError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise RlhbError(f"{path}: not a readable Parquet file ({exc})") from None
        if table.num_rows == 0:
            raise RlhbError(f"{path}: empty file, no rows to read")
        parsed = ParsedLogs(_plain_columns(table), np.arange(1, table.num_rows + 1), [], fmt)
    else:
        data = _load_bytes(path, gzipped)
        parsed = _read_jsonl(data) if fmt == "jsonl" else _read_csv(data, path)
    parsed.table, renamed = _rename(parsed.table, field_map or {}, path)
    parsed.was_number = {renamed.get(k, k): v for k, v in parsed.was_number.items()}
    return parsed


def _plain_columns(table: pa.Table) -> pa.Table:
    """Parquet's encodings as plain values: a dictionary-encoded (categorical) column as its values, bytes
    that are all UTF-8 as text, decimals as floats. Other types stay, to be refused per row by name."""
    columns = {}
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
            kind = column.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            try:
                column = column.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass  # bytes that are not UTF-8 stay bytes: a text field refuses them per row, naming the type
        elif pa.types.is_decimal(kind):
            column = column.cast(pa.float64())
        columns[name] = column
    return pa.table(columns)


def _rename(table: pa.Table, field_map: dict[str, str], path: Path) -> tuple[pa.Table, dict[str, str]]:
    names = list(table.column_names)
    original = list(names)
    for canonical, source in field_map.items():
        if source not in names:
            raise RlhbError(f"{path}: no column '{source}' for --field {canonical}={source} (columns: {', '.join(names)})")
        if canonical in names and canonical != source:
            names[names.index(canonical)] = f"{canonical}__original"
        names[names.index(source)] = canonical
    return table.rename_columns(names), dict(zip(original, names))


# ------------------------------------------------------------------------------------------ JSONL
def _read_jsonl(data: bytes) -> ParsedLogs:
    # One C pass keeps only the bytes the checks count (line ends and brackets): four scans of the file become one.
    marks = data.translate(None, _NOT_MARKS)
    normalized = data.replace(b"\r\n", b"\n") if b"\r" in marks else data
    # Fast path: Arrow's multi-threaded reader. Its row i is line i + 1 exactly when there are as many
    # rows as lines (it skips blank lines, which would shift the numbering).
    lines = marks.count(b"\n") + (not normalized.endswith(b"\n"))
    table = None
    if not _may_nest_deeper(marks, MAX_DEPTH):  # a native reader can crash on deep nesting
        try:
            table = pj.read_json(pa.BufferReader(normalized))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            table = None
    if (table is not None and table.num_rows == lines
            and not any(pa.types.is_struct(t) or pa.types.is_list(t) for t in table.schema.types)):
        return ParsedLogs(table, np.arange(1, table.num_rows + 1), [], "jsonl")
    return _read_jsonl_slow(normalized)


def _may_nest_deeper(marks: bytes, limit: int) -> bool:
    """Whether any value could nest deeper than `limit`: the running count of opening minus closing
    brackets (brackets inside strings count too, so it errs towards yes). Other bytes count zero, so the reader
    passes the file's brackets and line ends alone (bytes.translate) and the count walks them, not every byte."""
    if marks.count(b"[") + marks.count(b"{") <= limit:
        return False
    steps = np.frombuffer(marks, dtype=np.uint8)
    depth, block = 0, 1 << 24  # in blocks: a file of brackets would otherwise make a running count 4x its size
    for start in range(0, len(steps), block):
        running = np.cumsum(_BRACKET_STEP[steps[start:start + block]], dtype=np.int32) + depth
        if running.max() > limit:
            return True
        depth = int(running[-1])
    return False


_NOT_MARKS = bytes(b for b in range(256) if b not in b"[]{}\n\r")
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def _read_jsonl_slow(data: bytes) -> ParsedLogs:
    """Line by line: finds exactly which lines are not JSON objects, or hold values of the wrong kind."""
    rows: list[dict] = []
    numeric: list[set] = []  # keys whose value was a JSON number (a number is no text)
    lines: list[int] = []
    rejected: list[Rejected] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejected.append(Rejected(number, f"not valid UTF-8 (byte {exc.start})"))
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            rejected.append(Rejected(number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            rejected.append(Rejected(number, "not a log row: nested deeper than a JSON reader may go"))
            continue
        if not isinstance(row, dict):
            rejected.append(Rejected(number, f"not a JSON object (got {type(row).__name__})"))
            continue
        problem = None
        clean = {}
        numbers = set()
        for key, value in row.items():
            if isinstance(value, bool):  # true/false is no count; an event flag may still read it
                clean[key] = "true" if value else "false"
            elif isinstance(value, (int, float)):
                numbers.add(key)
                clean[key] = repr(value)
            elif isinstance(value, str) and _lone_surrogate(value):
                problem = problem or (key, f"field '{key}' holds a lone surrogate ({_lone_surrogate(value)}), "
                                           f"which is no text")
            elif value is None or isinstance(value, str):
                clean[key] = value
            else:
                problem = problem or (key, f"field '{key}' holds a {type(value).__name__}, not a value")
        if problem:
            rejected.append(Rejected(number, problem[1], problem[0]))
            continue
        rows.append(clean)
        numeric.append(numbers)
        lines.append(number)
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    table = pa.table({n: pa.array([r.get(n) for r in rows], type=pa.string()) for n in names}) if rows else pa.table({})
    was_number = {n: np.array([n in numeric[i] for i in range(len(rows))], dtype=bool) for n in names}
    return ParsedLogs(table, np.asarray(lines, dtype=np.int64), rejected, "jsonl", was_number)


def _lone_surrogate(text: str) -> str:
    """The first half of a UTF-16 pair standing alone in `text` (JSON's \\ud800 escape allows it), or ""."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return ""


# ------------------------------------------------------------------------------------------ CSV
def _read_csv(data: bytes, path: Path) -> ParsedLogs:
    data = data.replace(b"\r\n", b"\n")
    header_line = data.split(b"\n", 1)[0]
    try:
        header = next(csv.reader([header_line.decode("utf-8")]))
    except UnicodeDecodeError:
        raise RlhbError(f"{path}:1: the header is not valid UTF-8") from None
    if len(set(header)) != len(header):
        raise RlhbError(f"{path}:1: repeated column names in the header: {header}")
    bad_rows: list[Rejected] = []

    def on_invalid(row) -> str:
        bad_rows.append(Rejected(0, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        return "skip"

    def read(block_size: int | None) -> pa.Table:
        bad_rows.clear()
        return pcsv.read_csv(
            io.BytesIO(data), read_options=pcsv.ReadOptions(block_size=block_size) if block_size else None,
            parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.binary() for n in header},
                                                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )

    try:
        try:
            table = read(None)
        except pa.ArrowInvalid as exc:
            if "straddl" not in str(exc):
                raise
            table = read(min(len(data) + 1, 2**31 - 1))  # a value longer than a block: the file as one block
    except pa.ArrowInvalid as exc:
        raise RlhbError(f"{path}: not readable as CSV ({exc})") from None
    if bad_rows:
        # Rare path: rows with the wrong number of fields. Walk the records once to learn every line.
        lines, bad_rows = _csv_record_lines(data, len(header))
    else:
        # Line of each row: header is line 1; quoted values may span lines.
        newlines = np.zeros(table.num_rows, dtype=np.int64)
        for column in table.columns:
            newlines += pc.count_substring(column, pattern=b"\n").to_numpy(zero_copy_only=False).astype(np.int64)
        lines = 2 + np.concatenate([[0], np.cumsum(newlines + 1)[:-1]]) if table.num_rows else np.zeros(0, np.int64)
    columns = {}
    bad_utf8 = np.zeros(table.num_rows, dtype=bool)
    for name in header:
        column = table.column(name)
        try:
            columns[name] = column.cast(pa.string())
        except pa.ArrowInvalid:
            values = column.to_pylist()
            decoded = []
            for i, v in enumerate(values):
                try:
                    decoded.append(v.decode("utf-8"))
                except UnicodeDecodeError:
                    bad_utf8[i] = True
                    decoded.append(None)
            columns[name] = pa.array(decoded, type=pa.string())
    # Empty CSV cells are empty strings; a missing count or text is treated as missing, not as zero.
    for name in header:
        columns[name] = pc.if_else(pc.equal(columns[name], ""), pa.scalar(None, pa.string()), columns[name])
    table = pa.table(columns)
    rejected = bad_rows + [Rejected(int(lines[i]), "not valid UTF-8") for i in np.flatnonzero(bad_utf8)]
    if bad_utf8.any():
        keep = ~bad_utf8
        table = table.filter(pa.array(keep))
        lines = lines[keep]
    return ParsedLogs(table, lines, rejected, "csv")


def _csv_record_lines(data: bytes, n_fields: int) -> tuple[np.ndarray, list[Rejected]]:
    """(first line of each well-formed record, the malformed records) by reading the CSV record by record."""
    csv.field_size_limit(max(csv.field_size_limit(), len(data)))  # Python's reader stops at 128 KiB a value
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
    next(reader, None)
    good, bad = [], []
    start = reader.line_num + 1
    for record in reader:
        if record:
            if len(record) == n_fields:
                good.append(start)
            else:
                bad.append(Rejected(start, f"expected {n_fields} columns, got {len(record)}"))
        start = reader.line_num + 1
    return np.asarray(good, dtype=np.int64), bad


# ------------------------------------------------------------------------------------------ values
def to_numbers(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values as float64, is_missing, is_not_a_number) for a column of numbers or numeric strings."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    missing = column.is_null().to_numpy(zero_copy_only=False)
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        return values, missing, ~missing & ~np.isfinite(values)
    if pa.types.is_null(kind):
        return np.zeros(len(column)), missing, np.zeros(len(column), dtype=bool)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        ok = pc.match_substring_regex(column, _NUMBER).fill_null(False).to_numpy(zero_copy_only=False)
        safe = pc.if_else(pa.array(ok), column, pa.scalar("0", column.type))
        values = pc.cast(pc.utf8_trim_whitespace(safe), pa.float64()).to_numpy(zero_copy_only=False)
        return values, missing, ~missing & ~ok
    # booleans, lists, structs: present but not a number
    return np.zeros(len(column)), missing, ~missing


def text_column(parsed: ParsedLogs, name: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(column as strings, is_missing, is_not_text) for a text field (what it holds instead: `kind_of`)."""
    column = parsed.table.column(name)
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    missing = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        not_text = parsed.was_number.get(name, np.zeros(len(column), dtype=bool))
        return column, missing, not_text
    return pa.nulls(len(column), pa.string()), missing, ~missing


def kind_of(parsed: ParsedLogs, name: str) -> str:
    """What a column that should hold text holds instead, for the reject's reason."""
    kind = parsed.table.column(name).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind) or \
            pa.types.is_floating(kind):
        return "a number"
    return f"a value of type {kind}"
