"""The one place that turns (query, behaviour text) into model inputs.

The generator learns `generator_prompt(query, behaviour)` in SFT and is asked the same way in RL and
evaluation, with the most preferred behaviour as the condition (every aligner by default, so they differ
in their reward only); `--condition none` gives the no-behaviour variant. Judges (discriminator, classifier, reward model) read `judge_text`, plain text, so a judge
may have a different tokenizer from the policy.
"""

from __future__ import annotations

MAX_QUERY_CHARS = 600
MAX_RESPONSE_CHARS = 1200


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def generator_prompt(query: str, behavior_text: str | None = None) -> str:
    """Prompt of the policy; the response follows it after one space."""
    lines = [f"Question: {_clip(query, MAX_QUERY_CHARS)}"]
    if behavior_text is not None:
        lines.append(f"Users: {behavior_text}")
    lines.append("Answer:")
    return "\n".join(lines)


def judge_text(query: str, response: str, behavior_text: str | None = None) -> str:
    """What a judge reads: the behaviour first (never cut), then the question, then the answer."""
    lines = []
    if behavior_text is not None:
        lines.append(f"Users: {behavior_text}")
    lines.append(f"Question: {_clip(query, MAX_QUERY_CHARS)}")
    lines.append(f"Answer: {_clip(response, MAX_RESPONSE_CHARS)}")
    return "\n".join(lines)
