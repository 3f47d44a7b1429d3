"""prepare-behaviors through the real CLI: validation, accounting, binning, text, splits, run-dir rules."""

from __future__ import annotations

import gzip
import json
import math

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_jsonl, write_jsonl
from rlhb_cli import rundir, storage
from rlhb_cli.errors import RlhbError

GOOD = [
    {"query": "q1", "response": "a", "pv": 10, "clicks": 2, "likes": 5, "dislikes": 1},
    {"query": "q1", "response": "b", "pv": 0, "clicks": 0, "likes": 0, "dislikes": 0},
    {"query": "q2", "response": "c", "pv": 99, "clicks": 9, "likes": 0, "dislikes": 4},
    {"query": "q3", "response": "d", "pv": 3, "clicks": 3, "likes": 1, "dislikes": 1},
]


def prepared(run_dir):
    stage = run_dir / "prepare-behaviors"
    return (json.loads((stage / "summary.json").read_text()), datasets.load_from_disk(str(stage / "dataset")),
            read_jsonl(stage / "rejected.jsonl"))


def all_rows(data) -> list[dict]:
    return [row for split in data for row in data[split]]


def test_counts_basis_bins_and_shaped_reward_match_hand_computation(cli, tmp_path):
    logs = write_jsonl(tmp_path / "logs.jsonl", GOOD)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--behavior-basis", "counts", "--bins", 2,
        "--validation-fraction", 0, "--test-fraction", 0)
    summary, data, rejected = prepared(tmp_path / "run")
    assert rejected == [] and summary["rows_kept"] == 4
    rows = {r["response"]: r for r in all_rows(data)}
    # pv: log1p in [0, log 100]; one inner edge at log(100)/2 = log(10): 10 -> log 11 > log 10 -> bin 1
    assert [rows[k]["pv_bin"] for k in "abcd"] == [1, 0, 1, 0]
    # likes: log1p of 5, 0, 0, 1 in [0, log 6]; edge log(6)/2 ~ 0.896: log 2 = 0.693 -> bin 0
    assert [rows[k]["likes_bin"] for k in "abcd"] == [1, 0, 0, 0]
    # dislikes: log1p of 1, 0, 4, 1 in [0, log 5]; edge ~ 0.805
    assert [rows[k]["dislikes_bin"] for k in "abcd"] == [0, 0, 1, 0]
    assert rows["a"]["shaped_reward"] == pytest.approx((5 - 1) / (10 + 2))
    assert rows["b"]["shaped_reward"] == 0.0  # zero denominator: defined as 0
    assert rows["c"]["shaped_reward"] == pytest.approx(-4 / 108)
    assert summary["shaped_reward_zero_denominator_rows"] == 1
    bins = json.loads((tmp_path / "run" / "prepare-behaviors" / "bins.json").read_text())
    assert bins["edges"]["pv"] == pytest.approx([math.log(100) / 2])
    assert rows["a"]["behavior_text"] == "viewed by many, clicked by few, liked by many, disliked by few"


def test_rates_basis_uses_per_view_rates_and_query_relative_views(cli, tmp_path):
    rows = []
    for q in range(10):
        for r, (pv, likes) in enumerate([(100, 50), (50, 5), (10, 1)]):
            rows.append({"query": f"q{q}", "response": f"r{r}", "pv": pv * (q + 1), "clicks": 0,
                         "likes": likes * (q + 1), "dislikes": r})
    logs = write_jsonl(tmp_path / "logs.jsonl", rows)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--validation-fraction", 0, "--test-fraction", 0)
    summary, data, _ = prepared(tmp_path / "run")
    out = all_rows(data)
    # views relative to the query's mean are the same for every query: r0 high, r2 low, whatever the popularity
    assert {r["pv_bin"] for r in out if r["response"] == "r0"} == {2}
    assert {r["pv_bin"] for r in out if r["response"] == "r2"} == {0}
    # like rate 0.5 > 0.1 = 0.1: r0 top, r1 and r2 tie
    assert {r["likes_bin"] for r in out if r["response"] == "r0"} == {summary["levels"]["likes"] - 1}
    assert len({r["likes_bin"] for r in out if r["response"] != "r0"}) == 1
    assert summary["levels"]["clicks"] == 1  # no clicks at all: one level, no invented ones
    assert summary["most_preferred_text"].startswith("viewed by many")


def test_every_kind_of_bad_row_is_rejected_with_its_line_and_reason(cli, tmp_path):
    good = json.dumps(GOOD[0])
    lines = [
        good,                                                                   # 1 ok
        "{not json",                                                            # 2
        json.dumps({"query": "q", "response": "r", "clicks": 1, "likes": 0, "dislikes": 0}),  # 3 missing pv
        json.dumps({"query": "q", "response": "r", "pv": "lots", "clicks": 1, "likes": 0, "dislikes": 0}),  # 4
        json.dumps({"query": "q", "response": "r", "pv": -1, "clicks": 0, "likes": 0, "dislikes": 0}),  # 5
        json.dumps({"query": "q", "response": "r", "pv": 1e15, "clicks": 0, "likes": 0, "dislikes": 0}),  # 6
        json.dumps({"query": "q", "response": "r", "pv": 3, "clicks": 5, "likes": 0, "dislikes": 0}),  # 7
        json.dumps({"query": "  ", "response": "r", "pv": 3, "clicks": 1, "likes": 0, "dislikes": 0}),  # 8
        json.dumps({"query": "q", "response": "r", "pv": 2.5, "clicks": 1, "likes": 0, "dislikes": 0}),  # 9
        json.dumps({"query": 7, "response": "r", "pv": 3, "clicks": 1, "likes": 0, "dislikes": 0}),  # 10
        "[1, 2, 3]",                                                            # 11
        good,                                                                   # 12 duplicate of 1
        json.dumps({"query": "q", "response": "r", "pv": 3, "clicks": 1, "likes": 2, "dislikes": 2}),  # 13
        json.dumps({"query": "q", "response": "r", "pv": True, "clicks": 1, "likes": 0, "dislikes": 0}),  # 14
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"query": "q\xff", "response": "r", "pv": 1}\n'  # 15 bad UTF-8
    raw += json.dumps({"query": "fine", "response": "ok", "pv": 4, "clicks": 1, "likes": 1, "dislikes": 0}).encode() + b"\n"
    logs = tmp_path / "bad.jsonl"
    logs.write_bytes(raw)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--max-reject-ratio", 1.0)
    summary, data, rejected = prepared(tmp_path / "run")
    by_line = {r["line"]: r for r in rejected}
    expected = {2: "not valid JSON", 3: "missing field 'pv'", 4: "field 'pv' is not a number", 5: "negative",
                6: "absurdly large", 7: "clicks (5) > pv (3)", 8: "field 'query' is empty", 9: "not a whole count",
                10: "field 'query' must be text", 11: "not a JSON object", 12: "duplicate of line 1",
                13: "likes + dislikes (4) > pv (3)", 14: "field 'pv' is not a number", 15: "not valid UTF-8"}
    assert set(by_line) == set(expected)
    for line, text in expected.items():
        assert text in by_line[line]["reason"], (line, by_line[line])
    assert by_line[12]["kind"] == "duplicate" and by_line[4]["field"] == "pv"
    assert summary["rows_in"] == 16 == summary["rows_kept"] + summary["rows_rejected"] + summary["rows_duplicate"]
    assert summary["rows_kept"] == 2 and summary["rows_duplicate"] == 1
    assert sorted(r["source_line"] for r in all_rows(data)) == [1, 16]


def test_too_many_bad_rows_fail_the_stage_with_one_clear_line(cli, tmp_path):
    logs = tmp_path / "bad.jsonl"
    logs.write_text(json.dumps(GOOD[0]) + "\n{oops\n{oops\n")
    result = cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", ok=False)
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "2 of 3 rows are bad" in message and "line 2: not valid JSON" in message
    manifest = json.loads((tmp_path / "run" / "prepare-behaviors" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "max-reject-ratio" in manifest["error"]
    assert len(read_jsonl(tmp_path / "run" / "prepare-behaviors" / "rejected.jsonl")) == 2
    assert not (tmp_path / "run" / "prepare-behaviors" / "dataset").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "empty file"),
    ("blank.jsonl", b"\n \n", "empty file"),
    ("logs.txt", b"{}", "unknown extension .txt"),
    ("cut.jsonl.gz", gzip.compress(b'{"query": "q"}\n' * 50, mtime=0)[:-12], "truncated gzip"),
    ("plain.jsonl.gz", b"not gzip at all", "not a valid gzip"),
    ("nocols.jsonl", b'{"query": "q", "answer": "r"}\n', "no behaviour columns"),
    ("noresp.jsonl", b'{"query": "q", "pv": 1, "clicks": 0, "likes": 0, "dislikes": 0}\n', "no column 'response'"),
    ("missing.jsonl", None, "no such file"),
])
def test_unreadable_files_get_one_line_naming_the_file(cli, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = cli("prepare-behaviors", path, "--run-dir", tmp_path / "run", ok=False)
    assert result.exit_code == 2
    out = result.output.strip()
    assert message in out and name in out and "Traceback" not in out and "\n" not in out


def _flat(depth: int) -> str:
    return json.dumps({"query": "deep", "response": "r", "pv": 1, "clicks": 0, "likes": 0, "dislikes": 0}).replace(
        '"deep"', "[" * depth + "]" * depth)


@pytest.mark.parametrize("line, reason", [
    (_flat(20_000), "not a log row: nested deeper than a JSON reader may go"),  # Arrow's reader crashed on it
    (_flat(1_500), "not a log row: nested deeper than a JSON reader may go"),  # Python's: RecursionError
    (_flat(80), "field 'query' holds a list, not a value"),
    ('{"query": "half \\ud800 a pair", "response": "r", "pv": 1, "clicks": 0, "likes": 0, "dislikes": 0}',
     "field 'query' holds a lone surrogate (\\ud800), which is no text"),
])
def test_hostile_json_lines_are_rejected_with_their_reason(cli, tmp_path, line, reason):
    logs = tmp_path / "logs.jsonl"
    rows = [{**r, "query": f"{r['query']}-{i}"} for i in range(3) for r in GOOD]
    logs.write_text("".join(json.dumps(r) + "\n" for r in rows) + line + "\n", encoding="utf-8")
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--max-reject-ratio", 0.5)
    summary, _, rejected = prepared(tmp_path / "run")
    assert summary["rows_in"] == 13 and summary["rows_kept"] == 12
    assert [(r["line"], r["reason"]) for r in rejected if r["kind"] == "rejected"] == [(13, reason)]


def _depth_by_every_byte(data: bytes, limit: int) -> bool:
    """The reader's earlier nesting check, kept as the reference: a running count over every byte."""
    depth = 0
    for byte in data:
        depth += (byte in b"[{") - (byte in b"]}")
        if depth > limit:
            return True
    return False


def test_the_nesting_check_agrees_with_a_count_over_every_byte():
    import random

    from rlhb_cli.behaviors.read import _may_nest_deeper
    rng = random.Random(0)
    for trial in range(300):
        data = bytes(rng.choice(b'[]{}"ab\n') for _ in range(rng.randint(0, 400)))
        limit = rng.randint(0, 12)
        assert _may_nest_deeper(data, limit) == _depth_by_every_byte(data, limit), (trial, data, limit)


def test_repeated_rows_are_found_as_the_exact_key_comparison_finds_them():
    """The row hash only picks candidates: the first occurrence of every row equals the exact dictionary fold's
    (the earlier implementation) over all usable rows, nulls and texts that differ by one character included."""
    import numpy as np

    from rlhb_cli.behaviors.validate import _first_by_codes, _first_occurrence
    rng = np.random.default_rng(0)
    n = 5000
    query = pa.array([None if v == 0 else f"q{v}" for v in rng.integers(0, 40, n)], pa.string())
    response = pa.array([f"answer {v}" if v % 7 else f"answer {v} " for v in rng.integers(0, 30, n)], pa.string())
    window = pa.chunked_array([pa.array([None if v == 0 else str(v) for v in rng.integers(0, 3, n)], pa.string())])
    usable = rng.random(n) > 0.2
    got = _first_occurrence([query, response, window], usable)
    rows = np.flatnonzero(usable)
    want = np.arange(n)
    want[rows] = rows[_first_by_codes([c.take(pa.array(rows)) for c in (query, response, window)])]
    assert (got == want).all() and (got[usable] != np.flatnonzero(usable)).sum() > 500
    assert (_first_occurrence([response], np.zeros(n, dtype=bool)) == np.arange(n)).all()
    distinct = pa.array([f"row {i}" for i in range(n)], pa.string())
    assert (_first_occurrence([distinct], np.ones(n, dtype=bool)) == np.arange(n)).all()


def test_parquet_types_are_read_or_refused_per_row(cli, tmp_path):
    from decimal import Decimal
    import datetime
    n = len(GOOD)
    base = {k: [r[k] for r in GOOD] for k in GOOD[0]}
    cases = {  # column -> (values, rows kept, reason of the rejects)
        "dictionary text": ({"query": pa.array(base["query"]).dictionary_encode()}, n, None),
        "bytes as text": ({"response": pa.array([v.encode() for v in base["response"]])}, n, None),
        "decimal counts": ({"pv": pa.array([Decimal(v) for v in base["pv"]], pa.decimal128(12, 0))}, n, None),
        "timestamps": ({"likes": pa.array([datetime.datetime(2024, 1, 1)] * n, pa.timestamp("s"))}, 0,
                       "field 'likes' is not a number: datetime.datetime(2024, 1, 1, 0, 0)"),
        "lists": ({"dislikes": pa.array([[1]] * n)}, 0, "field 'dislikes' is not a number: [1]"),
        "structs": ({"clicks": pa.array([{"a": 1}] * n)}, 0, "field 'clicks' is not a number: {'a': 1}"),
        "int as text": ({"query": pa.array(range(n))}, 0, "field 'query' must be text, got a number"),
        "binary not UTF-8": ({"query": pa.array([b"\xff\xfe"] * n)}, 0,
                             "field 'query' must be text, got a value of type binary"),
    }
    for name, (columns, kept, reason) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.parquet"
        pq.write_table(pa.table({**base, **columns}), path)
        result = cli("prepare-behaviors", path, "--run-dir", tmp_path / name.replace(" ", "_"), ok=False)
        assert "Traceback" not in result.output, name
        if kept:
            assert result.exit_code == 0 and prepared(tmp_path / name.replace(" ", "_"))[0]["rows_kept"] == kept, name
        else:
            assert result.exit_code == 2 and f"first: line 1: {reason}" in " ".join(result.output.split()), \
                (name, result.output)
            ledger = read_jsonl(tmp_path / name.replace(" ", "_") / "prepare-behaviors" / "rejected.jsonl")
            assert len(ledger) == n and ledger[0]["reason"] == reason, name


def test_csv_values_longer_than_a_block_or_pythons_field_limit_are_read(cli, tmp_path):
    header = "query,response,pv,clicks,likes,dislikes\n"
    rows = "".join(f"q{i},a{i},10,1,2,1\n" for i in range(20))
    long_value = "x" * 3_000_000  # longer than Arrow's 1 MB block and Python's 128 KiB field limit
    (tmp_path / "long.csv").write_text(header + rows + f"qlong,{long_value},10,1,2,1\n")
    # a short row sends the reader down the record-by-record path, which Python's csv module walks
    (tmp_path / "short.csv").write_text(header + rows + "qshort,a,10\n" + f'qlong,"{long_value}",10,1,2,1\n')
    for name, kept in (("long.csv", 21), ("short.csv", 21)):
        cli("prepare-behaviors", tmp_path / name, "--run-dir", tmp_path / name.replace(".", "_"))
        summary, data, rejected = prepared(tmp_path / name.replace(".", "_"))
        assert summary["rows_kept"] == kept and max(len(r["response"]) for r in all_rows(data)) == 3_000_000
    assert [(r["line"], r["reason"]) for r in rejected] == [(22, "expected 6 columns, got 3")]


def test_bom_crlf_gzip_csv_and_parquet_read_the_same_rows(cli, tmp_path):
    text = "".join(json.dumps(r) + "\r\n" for r in GOOD).encode()
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(text))
    header = "query,response,pv,clicks,likes,dislikes\r\n"
    body = "".join(f'"{r["query"]}","{r["response"]}",{r["pv"]},{r["clicks"]},{r["likes"]},{r["dislikes"]}\r\n' for r in GOOD)
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbf" + (header + body).encode())
    pq.write_table(pa.Table.from_pylist(GOOD), tmp_path / "d.parquet")
    seen = []
    for name in ("a.jsonl", "b.jsonl.gz", "c.csv", "d.parquet"):
        run_dir = tmp_path / name.replace(".", "_")
        cli("prepare-behaviors", tmp_path / name, "--run-dir", run_dir, "--salt", "s")
        summary, data, rejected = prepared(run_dir)
        assert summary["rows_kept"] == 4 and rejected == [], name
        seen.append(sorted((r["query"], r["response"], r["pv"], r["behavior_text"]) for r in all_rows(data)))
    assert all(s == seen[0] for s in seen)


def test_csv_errors_name_the_right_line_even_after_multiline_values(cli, tmp_path):
    csv_text = ('query,response,pv,clicks,likes,dislikes\n'
                '"q1","line one\nline two",5,1,1,0\n'
                'q2,r2,abc,1,1,0\n'
                'q3,r3,5,1\n'
                'q4,r4,5,1,1,0\n')
    (tmp_path / "logs.csv").write_text(csv_text)
    cli("prepare-behaviors", tmp_path / "logs.csv", "--run-dir", tmp_path / "run", "--max-reject-ratio", 1)
    summary, data, rejected = prepared(tmp_path / "run")
    by_line = {r["line"]: r["reason"] for r in rejected}
    assert "not a number" in by_line[4] and "expected 6 columns" in by_line[5]
    assert sorted(r["source_line"] for r in all_rows(data)) == [2, 6]


def test_field_mapping_keep_fields_and_anonymised_user_ids(cli, tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "views": 10, "clicks": 1, "upvotes": 2, "downvotes": 1,
             "user_id": f"alice{i % 2}", "secret_note": "private", "lang": "en"} for i in range(6)]
    logs = write_jsonl(tmp_path / "logs.jsonl", rows)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--field", "query=question", "--field",
        "response=answer", "--field", "pv=views", "--field", "likes=upvotes", "--field", "dislikes=downvotes",
        "--keep-field", "lang", "--salt", "pepper")
    summary, data, _ = prepared(tmp_path / "run")
    out = all_rows(data)
    assert summary["dropped_columns"] == ["secret_note"]
    assert all(r["lang"] == "en" for r in out) and "secret_note" not in out[0]
    hashes = {r["query"]: r["user_id"] for r in out}
    assert "alice0" not in set(hashes.values()) and len(set(hashes.values())) == 2
    assert hashes["q0"] == hashes["q2"] != hashes["q1"]
    bad = cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run2", "--field", "likes=hearts", ok=False)
    assert "no column 'hearts' for --field likes=hearts" in bad.output


def test_no_raw_identifier_is_written_anywhere_in_the_run_dir(cli, tmp_path):
    """E-mail addresses as user ids, in kept rows, duplicates and bad rows: every file of the run dir is
    scanned for them; the rejects ledger keys duplicates by the same salted hash as the data set."""
    emails = [f"person{i}@example.org" for i in range(4)]
    rows = [{"query": f"q{i}", "response": f"a{i}", "pv": 10, "clicks": 1, "likes": 2, "dislikes": 1,
             "user_id": emails[i % 4]} for i in range(12)]
    rows += [dict(rows[0]), dict(rows[5]), {**rows[2], "likes": "many"}, {**rows[3], "pv": -1}]
    logs = write_jsonl(tmp_path / "logs.jsonl", rows)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--salt", "pepper", "--max-reject-ratio", 0.5)
    summary, data, _ = prepared(tmp_path / "run")
    assert summary["rows_duplicate"] == 2 and summary["rows_rejected"] == 2
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(e.encode() in content or e.encode("utf-16-le") in content for e in emails), path
    ledger = read_jsonl(tmp_path / "run" / "prepare-behaviors" / "rejected.jsonl")
    hashed = {r["user_id"] for r in all_rows(data)}
    assert {r["raw"]["user_id"] for r in ledger if r["reason"].startswith("duplicate")} <= hashed


def test_splits_are_disjoint_by_query_and_seeded(cli, tmp_path, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    summary, data, _ = prepared(sim_run)
    queries = {s: set(data[s]["query"]) for s in data}
    assert not queries["train"] & queries["validation"] and not queries["train"] & queries["test"]
    assert not queries["validation"] & queries["test"]
    assert sum(len(data[s]) for s in data) == summary["rows_kept"] == summary["rows_in"]
    assert summary["splits"]["validation"]["queries"] == 12 == summary["splits"]["test"]["queries"]
    other = tmp_path / "other"
    cli("prepare-behaviors", sim_run / "simulate-logs" / "logs.jsonl", "--run-dir", other, "--seed", 3)
    _, data_other, _ = prepared(other)
    assert set(data_other["test"]["query"]) != queries["test"]


def test_same_seed_gives_the_same_data_set(cli, tmp_path, sim_run):
    logs = sim_run / "simulate-logs" / "logs.jsonl"
    tables = []
    for name in ("one", "two"):
        cli("prepare-behaviors", logs, "--run-dir", tmp_path / name)
        _, data, _ = prepared(tmp_path / name)
        tables.append({s: data[s].to_pandas() for s in data})
    for split in tables[0]:
        assert tables[0][split].equals(tables[1][split])


def test_templates_and_bin_reuse(cli, tmp_path, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run, "--template", "zh")
    summary, data, _ = prepared(sim_run)
    assert summary["most_preferred_text"].startswith("浏览") and "点赞" in data["train"][0]["behavior_text"]
    template = tmp_path / "mine.json"
    template.write_text(json.dumps({"format": "V{pv} C{clicks} L{likes} D{dislikes}",
                                    "levels": {str(n): [str(i) for i in range(n)] for n in range(1, 6)}}))
    other = tmp_path / "other"
    cli("prepare-behaviors", sim_run / "simulate-logs" / "logs.jsonl", "--run-dir", other, "--template", template,
        "--bins-from", sim_run / "prepare-behaviors" / "bins.json")
    summary_other, data_other, _ = prepared(other)
    assert summary_other["most_preferred_text"].startswith("V2 C4 L4 D0")
    assert data_other["train"]["likes_bin"] == data["train"]["likes_bin"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "{pv} {likes}", "levels": {}}))
    result = cli("prepare-behaviors", sim_run / "simulate-logs" / "logs.jsonl", "--run-dir", tmp_path / "x",
                 "--template", broken, ok=False)
    assert result.exit_code == 2 and "does not name {clicks}, {dislikes}" in result.output


def test_simulated_logs_meet_the_most_preferred_share(cli, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    summary, data, _ = prepared(sim_run)
    assert summary["most_preferred_share_train"] >= 0.05
    assert summary["shaped_reward_mean_most_preferred"] > summary["shaped_reward_mean"]
    assert (sim_run / "prepare-behaviors" / "histograms.png").stat().st_size > 1000
    manifest = json.loads((sim_run / "prepare-behaviors" / "manifest.json").read_text())
    logs = sim_run / "simulate-logs" / "logs.jsonl"
    assert manifest["status"] == "done" and manifest["inputs"]["logs"]["sha256"] == storage.sha256_of(logs)
    assert manifest["config"]["behavior_basis"] == "rates" and manifest["seed"] == 0
    assert {"python", "pyarrow", "datasets"} <= set(manifest["versions"])
    assert manifest["started_at"] <= manifest["finished_at"] and "simulate-logs" in manifest["upstream"]


def test_stage_refuses_missing_failed_and_stale_inputs(cli, tmp_path, sim_run):
    empty = tmp_path / "empty_run"
    result = cli("prepare-behaviors", "--run-dir", empty, ok=False)
    assert result.exit_code == 2 and f"run `rlhb simulate-logs --run-dir {empty}` first" in result.output

    cli("prepare-behaviors", "--run-dir", sim_run)
    again = cli("prepare-behaviors", "--run-dir", sim_run)
    assert "already done" in again.output
    states = {r["stage"]: r["state"] for r in rundir.status_rows(sim_run)}
    assert states["simulate-logs"] == states["prepare-behaviors"] == "done"
    assert states["train-sft"] == "missing"

    logs = sim_run / "simulate-logs" / "logs.jsonl"
    logs.write_text(logs.read_text() + json.dumps(GOOD[0]) + "\n")
    states = {r["stage"]: (r["state"], r["detail"]) for r in rundir.status_rows(sim_run)}
    assert states["prepare-behaviors"] == ("stale", "inputs changed since: logs")
    with pytest.raises(RlhbError, match=r"prepare-behaviors in .* is stale: inputs changed since: logs; run `rlhb "
                                        r"prepare-behaviors LOGS --run-dir"):
        rundir.require_stage(sim_run, "prepare-behaviors")
    status = cli("status", "--run-dir", sim_run)
    assert "stale" in status.output

    manifest_path = sim_run / "simulate-logs" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["status"] = "failed"
    manifest["error"] = "boom"
    manifest_path.write_text(json.dumps(manifest))
    result = cli("prepare-behaviors", "--run-dir", sim_run, "--force", ok=False)
    assert "simulate-logs in" in result.output and "is failed: boom" in result.output


def test_interrupted_stage_is_reported_and_never_read(tmp_path):
    stage_dir = tmp_path / "run" / "simulate-logs"
    stage_dir.mkdir(parents=True)
    (stage_dir / "manifest.json").write_text(json.dumps({"status": "running", "pid": 2 ** 22 + 12345, "host": "x"}))
    (stage_dir / "logs.jsonl").write_text("half a fi")
    assert rundir.stage_state(stage_dir)[0] == "interrupted"
    with pytest.raises(RlhbError, match="is interrupted"):
        rundir.require_stage(tmp_path / "run", "simulate-logs")


def test_atomic_write_leaves_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    storage.atomic_write_json(path, {"a": 1})

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom

    monkeypatch.setattr(rundir.os, "replace", explode)
    with pytest.raises(Boom):
        storage.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_run_directory_can_be_moved_whole(cli, tmp_path, sim_run):
    cli("prepare-behaviors", "--run-dir", sim_run)
    moved = tmp_path / "elsewhere"
    sim_run.rename(moved)
    states = {r["stage"]: r["state"] for r in rundir.status_rows(moved)}
    assert states["prepare-behaviors"] == "done"
    manifest = json.loads((moved / "prepare-behaviors" / "manifest.json").read_text())
    assert manifest["inputs"]["logs"]["path"] == "RUN_DIR/simulate-logs/logs.jsonl"


def test_split_codes_rank_queries_as_a_sort_of_their_hashes_bytes_does():
    """split_codes sorts the seeded blake2b hashes as big-endian integers in numpy: the same order as sorting the
    hashes' bytes, so every query keeps the split it had when the split sorted Python strings."""
    import hashlib

    from rlhb_cli.behaviors.prepare import SPLITS, split_codes

    queries = [f"query {i}" for i in range(2000)] + ["", "é", "a\0b"]
    for seed, validation, test in ((0, 0.1, 0.1), (3, 0.25, 0.0), (9, 0.0, 0.5)):
        ranked = sorted(queries, key=lambda q: hashlib.blake2b(f"{seed}\0{q}".encode(), digest_size=8).digest())
        n_test, n_val = round(len(queries) * test), round(len(queries) * validation)
        expected = {q: "test" if i < n_test else "validation" if i < n_test + n_val else "train"
                    for i, q in enumerate(ranked)}
        codes = split_codes(queries, seed, validation, test)
        assert [SPLITS[c] for c in codes] == [expected[q] for q in queries]


def test_the_histogram_child_ends_with_the_stage_and_its_failure_is_one_line(tmp_path):
    """The plot's child starts before the numbers exist: a stage that fails first leaves no child and no
    PNG behind; a child that cannot draw is reported in one line naming the PNG."""
    from rlhb_cli import plots
    from rlhb_cli.errors import RlhbError

    with pytest.raises(RuntimeError, match="stage failed"):
        with plots.Drawing("histograms", tmp_path / "early.png") as early:
            raise RuntimeError("stage failed")
    assert early.process.returncode == 0 and not (tmp_path / "early.png").exists()

    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RlhbError, match=r"bad\.png: plotting failed \(KeyError: 'panels'\)"):
        with plots.Drawing("histograms", tmp_path / "bad.png") as bad:
            bad.draw(tmp_path / "bad.json")
            bad.wait_for()


def _mixed_logs(path, rows: int = 4000, seed: int = 7, broken: bool = False):
    """Logs through prepare-behaviors' main paths: many queries, exact repeats, rows with a negative count,
    user ids and a group column; `broken` adds a line that is not JSON (the line-by-line reader)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(rows):
        pv = int(rng.zipf(1.8)) + int(rng.integers(0, 30))
        likes = int(rng.binomial(pv, 0.2))
        row = {"query": f"question {int(rng.integers(0, rows // 8))}", "response": f"answer {i % (rows // 3)}",
               "pv": pv, "clicks": int(rng.binomial(pv, 0.3)), "likes": likes,
               "dislikes": int(rng.binomial(pv - likes, 0.1)), "user_id": f"user{i % 13}", "conversation": i % 97}
        if i % 211 == 5:
            row["pv"] = -1
        lines.append(json.dumps(row))
        if i % 97 == 3:
            lines.append(json.dumps(row))  # an exact repeat
    if broken:  # a line that is not JSON sends the whole file down the line-by-line reader
        lines.insert(50, "{broken")
    path.write_text("\n".join(lines) + "\n")
    return path


PINNED = {  # sha256 of each run's data set rows, rejects ledger, summary and bins, from the implementation of 7cd5c4f
    "rates": "cd2f91314f676b90cc9e81275f86132b8d514dfde93900bc0c58552e264b241d",
    "counts": "962e3c66abb6b5ce519e28627184aa431afd28b82c7568fbf6fe7a106e9f4b89",
    "grouped": "c392bc980093641a55399fdb344b60e9f6ee454d5fb8bbe6989e4d5da77043b0",
}


@pytest.mark.parametrize("name,options", [
    ("rates", []),
    ("counts", ["--behavior-basis", "counts", "--bins", 4]),  # and a line that is not JSON
    ("grouped", ["--group-field", "conversation", "--keep-field", "conversation"]),
])
def test_prepared_output_is_what_the_earlier_implementation_wrote(cli, tmp_path, name, options):
    """Speed work on prepare-behaviors (issue 31) must leave every output the same: the rows of each split in
    order, the rejects ledger, the counts of the summary and the bins, pinned from before it."""
    import hashlib

    logs = _mixed_logs(tmp_path / "logs.jsonl", broken=name == "counts")
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run", "--salt", "pepper", "--max-reject-ratio", 0.5,
        *options)
    stage = tmp_path / "run" / "prepare-behaviors"
    summary, data, rejected = prepared(tmp_path / "run")
    summary.pop("logs")
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        digest.update(json.dumps([split, str(data[split].features), data[split].to_list()], sort_keys=True).encode())
    for name_of in ("bins.json", "behavior.json", "histograms.json"):
        digest.update((stage / name_of).read_bytes())
    digest.update(json.dumps([rejected, summary], sort_keys=True).encode())
    assert digest.hexdigest() == PINNED.get(name), (name, digest.hexdigest())
