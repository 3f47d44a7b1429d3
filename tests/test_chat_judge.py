"""The chat-endpoint judge against a local server: retries, rate limit, cache, key, clear failures."""

from __future__ import annotations

import math
import time

import pytest

from chat_server import ChatServer
from rlhb_cli.evaluation.chat_judge import ChatJudge, parse_rating
from rlhb_cli.errors import RlhbError


def test_ratings_are_cached_and_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    queries = ["What is the capital of France?"] * 3
    responses = ["Paris.", "The capital of France is Paris, a city on the Seine.", "Paris."]
    with ChatServer(fail_first=2) as server:
        judge = ChatJudge(server.url, "judge-model", tmp_path / "cache.sqlite", key_env="MY_KEY",
                          requests_per_minute=0, backoff_seconds=0.01)
        ratings = judge.score(queries, responses)
        assert ratings == [1.0, 4.0, 1.0]
        assert len(server.requests) == 2 + 2  # two 429s retried; the third text repeats the first
        assert judge.cache_hits == 1
        assert server.requests[-1]["path"] == "/v1/chat/completions"
        assert server.requests[-1]["authorization"] == "Bearer secret"
        assert server.requests[-1]["body"]["model"] == "judge-model"
        again = ChatJudge(server.url, "judge-model", tmp_path / "cache.sqlite", requests_per_minute=0)
        assert again.score(queries, responses) == ratings and again.calls == 0  # a rerun costs nothing


def test_rate_limit_spaces_requests(tmp_path):
    with ChatServer() as server:
        judge = ChatJudge(server.url, "m", tmp_path / "cache.sqlite", requests_per_minute=600)  # 0.1 s apart
        started = time.monotonic()
        judge.score(["q"] * 4, ["a", "b", "c", "d"])
        assert time.monotonic() - started >= 0.29


def test_unrated_replies_and_failures(tmp_path):
    with ChatServer(reply="I cannot rate this.") as server:
        judge = ChatJudge(server.url, "m", tmp_path / "cache.sqlite", requests_per_minute=0)
        assert math.isnan(judge.score(["q"], ["a"])[0]) and judge.unparsed == 1
    with ChatServer(fail_first=10, status=401) as server:
        judge = ChatJudge(server.url, "m", tmp_path / "other.sqlite", requests_per_minute=0, backoff_seconds=0.01)
        with pytest.raises(RlhbError, match="HTTP 401"):
            judge.score(["q"], ["a"])
        assert len(server.requests) == 1  # not retryable
    assert parse_rating("Rating: 8/10") == 8.0 and parse_rating("10") == 10.0 and parse_rating("none") is None


def test_the_key_never_follows_a_redirect_to_another_host(tmp_path, monkeypatch):
    """An endpoint that redirects (302) to another server: urllib follows it as a GET with every header, the
    key's Authorization included; the judge refuses the redirect in one line and the other host hears nothing."""
    monkeypatch.setenv("MY_KEY", "secret")
    with ChatServer() as elsewhere, ChatServer(redirect_to=elsewhere.url + "/chat/completions") as server:
        judge = ChatJudge(server.url, "m", tmp_path / "cache.sqlite", key_env="MY_KEY", requests_per_minute=0,
                          backoff_seconds=0.01)
        with pytest.raises(RlhbError, match="a redirect to .* give the final endpoint as --judge-url"):
            judge.score(["q"], ["a"])
        assert len(server.requests) == 1 and server.requests[0]["authorization"] == "Bearer secret"
        assert elsewhere.requests == []
    assert not any("secret" in p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file())
