"""A judge behind an OpenAI-compatible chat endpoint (the paper's GPT-4 ranking), called only when asked.

Each (query, response) is rated 1-10 by the model; answers are cached in SQLite by (model, prompt), so
a rerun costs nothing; requests are spaced to a rate limit and retried with backoff on 429, 5xx and
network errors. The key comes from an environment variable, never from a flag or a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from rlhb_cli.errors import RlhbError

INSTRUCTION = ("You judge answers on a question-answering platform. Rate how much its users would like the "
               "answer below, from 1 (they would dislike it) to 10 (they would like it very much). "
               "Reply with the number only.")
RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect with every header of the request, the key's Authorization included, to
    whatever host the reply names: a redirect is refused instead, so the key goes to the URL given alone."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RlhbError(f"{req.full_url}: the judge endpoint answered HTTP {code}, a redirect to {newurl}; rlhb "
                        f"sends its key only to the URL given, so give the final endpoint as --judge-url")


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def rating_prompt(query: str, response: str) -> str:
    return f"Question: {query}\n\nAnswer: {response}"


def parse_rating(text: str) -> float | None:
    match = re.search(r"\b(10|[1-9])(?:\.\d+)?\b", text)
    return float(match.group(0)) if match else None


class ChatJudge:
    def __init__(self, url: str, model: str, cache_path: Path, key_env: str = "RLHB_JUDGE_API_KEY",
                 requests_per_minute: float = 60.0, max_retries: int = 4, timeout: float = 60.0,
                 backoff_seconds: float = 1.0):
        self.endpoint = url.rstrip("/") + ("/chat/completions" if not url.rstrip("/").endswith("/chat/completions")
                                           else "")
        self.model = model
        self.key = os.environ.get(key_env)
        self.interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff_seconds
        self.last_request = 0.0
        self.calls = 0
        self.cache_hits = 0
        self.unparsed = 0
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache = sqlite3.connect(str(cache_path))
        self.cache.execute("CREATE TABLE IF NOT EXISTS ratings (key TEXT PRIMARY KEY, reply TEXT)")

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, INSTRUCTION, prompt]).encode()).hexdigest()

    def _request(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "system", "content": INSTRUCTION}, {"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            wait = self.last_request + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.last_request = time.monotonic()
            try:
                self.calls += 1
                request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with _OPENER.open(request, timeout=self.timeout) as reply:
                    data = json.loads(reply.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
                if exc.code not in RETRYABLE:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            except (KeyError, IndexError, ValueError):
                raise RlhbError(f"{self.endpoint}: the reply is not an OpenAI-style chat completion") from None
            time.sleep(self.backoff * 2 ** attempt)
        raise RlhbError(f"{self.endpoint}: the judge endpoint failed ({last_error}) after {attempt + 1} attempts")

    def score(self, queries: list[str], responses: list[str]) -> list[float]:
        """A 1-10 rating per response (NaN where the reply holds no number; counted in `unparsed`)."""
        out = []
        for query, response in zip(queries, responses):
            prompt = rating_prompt(query, response)
            key = self._key(prompt)
            row = self.cache.execute("SELECT reply FROM ratings WHERE key = ?", (key,)).fetchone()
            if row is None:
                reply = self._request(prompt)
                self.cache.execute("INSERT OR REPLACE INTO ratings VALUES (?, ?)", (key, reply))
                self.cache.commit()
            else:
                reply = row[0]
                self.cache_hits += 1
            rating = parse_rating(reply)
            if rating is None:
                self.unparsed += 1
            out.append(float("nan") if rating is None else rating)
        return out
