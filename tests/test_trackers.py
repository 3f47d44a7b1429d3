"""--report-to: every metrics row read back from TensorBoard's event files, wandb's offline run and trackio's
local store, equal to metrics.jsonl's; a tracker that is unknown or not installed refused in one line."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RL, TINY, read_jsonl
from rlhb_cli import trackers
from rlhb_cli.errors import RlhbError

pytest.importorskip("tensorboard")


def tensorboard_rows(folder: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    return rows


def wandb_records(run_file: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    """(config, step -> values) of an offline wandb run, read from its record log (32 KiB blocks of chunks
    with a 7-byte header: crc, length, type; type 1 a whole record, 2-4 its first, middle, last part)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, records, part = run_file.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(part)
            part = b""
    config, rows = {}, {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif record.WhichOneof("record_type") == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[values.pop("_step")] = {k: v for k, v in values.items() if not k.startswith("_")}
    return config, rows


def expected(metrics: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step (SFT writes a training and an evaluation row at one step: a dashboard shows both)."""
    rows: dict[int, dict[str, float]] = {}
    for row in read_jsonl(metrics):
        rows.setdefault(row["step"], {}).update(trackers.scalars(row))
    return rows


def assert_same(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for step, values in want.items():
        assert set(got[step]) == set(values), step
        for key, value in values.items():
            assert math.isclose(got[step][key], value, rel_tol=rel, abs_tol=1e-12), (step, key)


def test_every_tracker_sees_the_ppo_rows_as_written(rl_run, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", TRACKIO_DIR=str(tmp_path / "trackio"),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "rlhb_cli", "train-oracle", "--run-dir", str(rl_run), "--iterations",
                           "3", *map(str, RL), "--report-to", "tensorboard,wandb,trackio"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    want = expected(rl_run / "train-oracle" / "metrics.jsonl")
    assert len(want) == 3 and all(len(v) > 10 for v in want.values())

    assert_same(tensorboard_rows(rl_run / "tensorboard" / "train-oracle"), want, rel=1e-6)  # float32 in the events

    (run_file,) = (rl_run / "wandb").glob("offline-run-*/run-*.wandb")
    config, rows = wandb_records(run_file)
    assert_same(rows, want, rel=0)
    assert config["iterations"] == 3 and config["learning_rate"] == json.loads(
        (rl_run / "train-oracle" / "manifest.json").read_text())["config"]["learning_rate"]

    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs(sys.argv[1], 'train-oracle'), default=str))")
    logged = subprocess.run([sys.executable, "-c", read, rl_run.name], capture_output=True, text=True, env=env,
                            check=True).stdout
    rows = {r.pop("step"): {k: v for k, v in r.items() if k != "timestamp"} for r in json.loads(logged)}
    assert_same(rows, want, rel=0)


def test_trainer_and_judge_stages_report_their_rows(rl_run, cli):
    """SFT (rows from trl's Trainer) and a judge (its own loop) through the same path, keys as metrics.jsonl's."""
    cli("train-sft", "--run-dir", rl_run, "--force", "--epochs", 1, "--max-train-rows", 64, *TINY,
        "--report-to", "tensorboard")
    cli("warmup-discriminator", "--run-dir", rl_run, "--force", "--backbone", "tiny", "--epochs", 1,
        "--max-train-rows", 300, "--report-to", "tensorboard")
    for stage in ("train-sft", "warmup-discriminator"):
        want = expected(rl_run / stage / "metrics.jsonl")
        assert want
        assert_same(tensorboard_rows(rl_run / "tensorboard" / stage), want, rel=1e-6)
    assert not (rl_run / "tensorboard" / "train-classifier").exists()  # only the stages asked to report


def test_report_to_is_checked_before_anything_runs(rl_run, cli, monkeypatch):
    assert trackers.parse_report_to(None) == () == trackers.parse_report_to("none")
    assert trackers.parse_report_to("tensorboard, tensorboard") == ("tensorboard",)
    with pytest.raises(RlhbError, match="--report-to mlflow: unknown tracker; choose from tensorboard, wandb"):
        trackers.parse_report_to("tensorboard,mlflow")
    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real_find_spec(name))
    result = cli("train-oracle", "--run-dir", rl_run, "--iterations", 1, *RL, "--report-to", "wandb", ok=False)
    assert result.exit_code != 0
    assert "--report-to wandb: wandb is not installed; pip install 'rlhb-cli[wandb]'" in result.output
    assert "Traceback" not in result.output and not (rl_run / "train-oracle").exists()


def test_hyperparameters_are_flat_scalars():
    flat = trackers.hyperparameters({"a": 1, "b": {"c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a": 1, "b.c": "[1, 2]", "b.d": "None", "e": "x", "f": True}
