"""Gold-free trust: a sealed split no training stage reads, and on it each judge ordering real answers
against their users' behaviour beside trivial judges (length, position)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from conftest import SHARED_DATA, summary_of
from rlhb_cli.behaviors.prepare import TrainingSplits, queries_digest
from rlhb_cli.errors import RlhbError
from rlhb_cli.evaluation.ordering import judge_ordering, per_query_agreement, sealed_rows, sealed_status
from rlhb_cli.evaluation.referee import cross_fitted_referee, half_of


def test_pairwise_agreement_is_counted_by_hand():
    groups = [np.array([0, 1, 2]), np.array([3, 4])]
    scores = np.array([3.0, 2.0, 2.0, 1.0, 1.0])
    target = np.array([1.0, 0.0, 2.0, 5.0, 4.0])
    accuracy, spearman = per_query_agreement(groups, scores, target)
    # query 1: (0,1) right, (0,2) wrong, (1,2) a tie in score: 1.5 of 3; query 2: a tie: 0.5 of 1
    assert accuracy == [0.5, 0.5] and len(spearman) == 1  # Spearman needs three answers
    assert per_query_agreement([np.array([0, 1])], np.array([1.0, 2.0]), np.array([3.0, 3.0])) == ([], [])


def test_the_sealed_split_is_refused_to_training_and_its_readers_recorded(rl_run, cli, tmp_path):
    data = datasets.load_from_disk(str(rl_run / "prepare-behaviors" / "dataset"))
    splits = TrainingSplits(data, rl_run / "prepare-behaviors" / "dataset")
    assert sorted(splits) == ["train", "validation"]
    with pytest.raises(RlhbError, match="the test split is sealed: no training stage reads it"):
        splits["test"]
    prepared = summary_of(rl_run, "prepare-behaviors")["sealed"]
    assert prepared["queries_sha256"] == queries_digest(set(data["test"]["query"]))
    for stage in ("train-sft", "warmup-discriminator", "train-classifier"):
        assert json.loads((rl_run / stage / "manifest.json").read_text())["splits_read"] == ["train", "validation"]
    reward = summary_of(rl_run, "train-reward")
    sealed_prompts = set(data["test"]["query"])
    ledger = [json.loads(line) for line in (rl_run / "train-reward" / "rejected.jsonl").read_text().splitlines()]
    assert reward["pairs_sealed"] == sum("sealed test query" in r["reason"] for r in ledger)
    pairs = [json.loads(line) for line in (rl_run / "simulate-logs" / "preferences.jsonl").read_text().splitlines()]
    assert reward["pairs_sealed"] == sum(p["prompt"] in sealed_prompts for p in pairs)
    assert sealed_status(rl_run, "test", "evaluate") == {"split": "test", "read_by_training": [], "unrecorded": [],
                                                         "unseen": True}

    cli("evaluate", "--run-dir", rl_run, "--policies", "train-sft", "--samples", 1, "--max-new-tokens", 6,
        "--following-queries", 0, "--bootstrap-samples", 50)
    detail = json.loads((rl_run / "evaluate" / "summary_detail.json").read_text())
    ordering = detail["judge_ordering"]
    assert ordering["answers"] == len(data["test"]) and detail["sealed"]["unseen"]
    assert {"discriminator", "classifier", "reward_model", "gold", "length", "position"} <= set(ordering["judges"])
    for entry in ordering["judges"].values():
        accuracy = entry["shaped_reward"]["pairwise_accuracy"]
        assert 0 <= accuracy["ci95"][0] <= accuracy["mean"] <= accuracy["ci95"][1] <= 1
    assert ordering["judges"]["gold"]["shaped_reward"]["pairwise_accuracy"]["mean"] > 0.6  # gold knows its users
    referee = detail["referee"]
    assert referee["answers_logged"] == len(data["test"]) and "pairwise_accuracy" in referee["agreement"]
    assert referee["policies"]["train-sft"]["queries"] == len(set(data["test"]["query"]))
    report = (rl_run / "evaluate" / "summary.json")
    assert json.loads(report.read_text())["sealed_split_unseen"] is True

    manifest_path = rl_run / "train-sft" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"splits_read": ["train", "test"]}))
    assert sealed_status(rl_run, "test", "evaluate")["read_by_training"] == ["train-sft"]


def test_real_answers_ordered_by_trivial_judges_on_stack_exchange(cli, tmp_path):
    logs = tmp_path / "se.jsonl"
    cli("import", "stackexchange", SHARED_DATA / "stackexchange-cardano", "--out", logs)
    cli("prepare-behaviors", logs, "--run-dir", tmp_path / "run")
    test = datasets.load_from_disk(str(tmp_path / "run" / "prepare-behaviors" / "dataset" / "test"))
    rows = sealed_rows(test["query"], 0, 0)
    ordering = judge_ordering(test["query"], test["response"], test["source_line"],
                              {"shaped_reward": test["shaped_reward"], "likes": test["likes"]}, {}, 200, 0)
    assert ordering["answers"] == len(rows) == len(test) and ordering["queries_with_pairs"] >= 10
    for name in ("length", "position"):
        entry = ordering["judges"][name]["likes"]
        assert entry["queries"] >= 10 and 0 < entry["pairwise_accuracy"]["mean"] < 1
    few = sealed_rows(test["query"], 40, 0)
    assert len(few) <= 40 and all(test["query"][i] in {test["query"][j] for j in few} for i in few)


def test_the_referee_is_cross_fitted_and_reports_what_it_is_worth():
    """Rewards linear in the (fake) embedding: a referee that learns on one half orders the other half's
    answers as their users did; a policy whose answers embed to higher rewards gains over the baseline."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    texts: dict[str, np.ndarray] = {}

    def embed(batch):
        return np.stack([texts.setdefault(t, rng.normal(size=8)) for t in batch])

    queries = [f"q{i}" for i in range(40) for _ in range(4)]
    responses = [f"answer {i}" for i in range(len(queries))]
    features = embed([f"Question: {q}\nAnswer: {r}" for q, r in zip(queries, responses)])
    assert len({half_of(q, 0) for q in queries}) == 2
    logged = {"query": queries, "response": responses, "shaped_reward": list(features @ direction)}
    good = [f"good {i}" for i in range(40)]
    bad = [f"bad {i}" for i in range(40)]
    for name, sign in ((good, 1.0), (bad, -1.0)):
        for i, r in enumerate(name):
            texts[f"Question: q{i}\nAnswer: {r}"] = sign * direction / np.linalg.norm(direction) * 3
    out = cross_fitted_referee(logged, {"base": ([f"q{i}" for i in range(40)], bad),
                                        "aligned": ([f"q{i}" for i in range(40)], good)}, "base", 200, 0, embed=embed)
    assert out["agreement"]["pairwise_accuracy"]["mean"] > 0.9
    assert out["policies"]["aligned"]["gain_over_baseline"]["ci95"][0] > 0
    assert "gain_over_baseline" not in out["policies"]["base"]
