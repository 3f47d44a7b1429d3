"""docs/python-api.md runs as written: every Python block, in order, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_every_example_of_the_python_api_page_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # my_rewards.py, as a user's module beside them
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own examples
    out = capsys.readouterr().out
    assert "train-sft" in out and "plain" in out and "short-and-polite" in out
    assert (tmp_path / "runs" / "api" / "train-ppo" / "policy" / "policy.json").exists()
    scores = [line.split()[:2] for line in out.splitlines() if re.match(r"^[+-]\d\.\d{3} [+-]\d\.\d{3}  ", line)]
    assert len(scores) == len(namespace["queries"]) > 0  # one line per judged answer: our judge and the gold users
