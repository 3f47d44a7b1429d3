"""Behaviour as natural language: bins become words ("viewed by many, liked by many, disliked by few").

A template is a JSON file with a `format` naming {pv}, {clicks}, {likes} and {dislikes}, and `levels`
mapping a number of levels to its words, lowest first. English and Chinese ship with the package;
`--template FILE` takes one's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from rlhb_cli.behaviors.binning import METRICS, BinSpec, decode_pattern, most_preferred_levels
from rlhb_cli.errors import RlhbError

SHIPPED = ("en", "zh")


@dataclass
class BehaviorTemplate:
    language: str
    format: str
    levels: dict[int, list[str]]
    source: str

    @classmethod
    def load(cls, name_or_path: str) -> "BehaviorTemplate":
        if name_or_path in SHIPPED:
            source = f"shipped:{name_or_path}"
            text = resources.files("rlhb_cli.behaviors").joinpath(f"templates/{name_or_path}.json").read_text("utf-8")
        else:
            path = Path(name_or_path)
            source = str(path)
            try:
                text = path.read_text(encoding="utf-8-sig")
            except FileNotFoundError:
                raise RlhbError(f"{path}: no such template file (or use a shipped one: {', '.join(SHIPPED)})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RlhbError(f"{source}:{exc.lineno}: template is not valid JSON ({exc.msg})") from None
        for key in ("format", "levels"):
            if key not in data:
                raise RlhbError(f"{source}: template has no '{key}'")
        missing = [m for m in METRICS if "{" + m + "}" not in data["format"]]
        if missing:
            raise RlhbError(f"{source}: field 'format' does not name {', '.join('{' + m + '}' for m in missing)}")
        try:
            levels = {int(k): [str(w) for w in v] for k, v in data["levels"].items()}
        except (TypeError, ValueError, AttributeError):
            raise RlhbError(f"{source}: field 'levels' must map a number of levels to a list of words") from None
        for count, words in levels.items():
            if len(words) != count:
                raise RlhbError(f"{source}: field 'levels.{count}' has {len(words)} words, needs {count}")
        return cls(str(data.get("language", "custom")), data["format"], levels, source)

    def words(self, n_levels: int) -> list[str]:
        if n_levels not in self.levels:
            raise RlhbError(f"{self.source}: the template has no words for {n_levels} levels; add \"{n_levels}\": "
                            f"[...] to its levels (it has {sorted(self.levels)})")
        return self.levels[n_levels]

    def render(self, spec: BinSpec, levels: dict[str, int]) -> str:
        return self.format.format(**{m: self.words(spec.levels(m))[levels[m]] for m in METRICS})

    def render_codes(self, spec: BinSpec, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(unique pattern codes, their texts): render each pattern once, not each row."""
        unique = np.unique(codes)
        return unique, np.array([self.render(spec, decode_pattern(spec, c)) for c in unique], dtype=object)

    def most_preferred(self, spec: BinSpec) -> str:
        """The condition RLHB asks for at inference: the best level of every metric."""
        return self.render(spec, most_preferred_levels(spec))


def best_logged(behaviors: list[str], rewards: list[float], min_rows: int) -> str:
    """The logged behaviour text whose rows have the highest mean shaped reward, among texts with at least
    `min_rows` rows: the condition the reward's own definition prefers. The most preferred text asks for
    the most views and clicks, which the shaped reward divides by."""
    sums: dict[str, list[float]] = {}
    for text, reward in zip(behaviors, rewards):
        sums.setdefault(text, []).append(float(reward))
    eligible = {t: sum(r) / len(r) for t, r in sums.items() if len(r) >= min_rows}
    if not eligible:
        raise RlhbError(f"no logged behaviour has {min_rows} training rows (the most has "
                        f"{max(map(len, sums.values()), default=0)}); lower --condition-min-rows")
    return max(sorted(eligible), key=eligible.get)
