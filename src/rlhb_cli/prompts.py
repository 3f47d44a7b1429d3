"""The one place that turns (query, behaviour text), or a conversation so far, into model inputs.

The generator learns `PromptFormat.prompt(query, behaviour)` in SFT and is asked the same way in RL and
evaluation, with the most preferred behaviour as the condition (every aligner by default, so they differ
in their reward only); `--condition none` gives the no-behaviour variant. Two formats:

- plain: "Question: ... / Users: ... / Answer:", the response after one space; the tiny model built here
  learns it from scratch (and every result recorded before the chat format existed used it);
- chat: the model's own chat template, the behaviour condition as the system turn and the query as the
  user's, the response as the assistant's turn ended by the template's end-of-turn token (its EOS).

SFT chooses the format (`--prompt-format auto`: chat for a pretrained model with a template, plain for
tiny) and records it in the policy's policy.json; every later stage reads it from there.
Judges (discriminator, classifier, reward model) read `judge_text`, plain text, so a judge may have a
different tokenizer from the policy.

A log row's query may be a whole conversation so far, written by `conversation_query` ("User: ...",
"Assistant: ...", blank-line separated, the user's message last: what the oasst import and simulated
conversations write). `prompt` turns such a query back into turns (`conversation_of`), so every stage that
prompts with a query (SFT, RL, evaluation) prompts with the conversation: the chat template's own turns, or
the plain format's Question / Answer lines; a judge reads its latest turns when it is too long.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from rlhb_cli.errors import RlhbError

MAX_QUERY_CHARS = 600
MAX_RESPONSE_CHARS = 1200
PROMPT_FORMATS = ("plain", "chat")


_SPEAKERS = {"user": "User", "assistant": "Assistant"}
_TURN_BREAK = re.compile(r"\n\n(?=(?:User|Assistant): )")


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def _clip_start(text: str, limit: int) -> str:
    """The end of `text` (a conversation's latest turns matter most), its cut start marked."""
    text = text.strip()
    return text if len(text) <= limit else "... " + text[-limit:].lstrip()


def conversation_query(messages: list[dict]) -> str:
    """A conversation so far (turns of role user / assistant, the user's last) as one query string; a
    one-message conversation is its message's text."""
    if not messages or messages[-1]["role"] != "user":
        raise RlhbError("a conversation's query ends with the user's message")
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def conversation_of(query: str) -> list[dict]:
    """The turns of a query `conversation_query` wrote (a plain question is one user turn). A question that
    happens to look like a transcript ("User: ..." with an "Assistant: " turn and the user's last) is read
    as one."""
    if not query.startswith("User: ") or "\n\nAssistant: " not in query:
        return [{"role": "user", "content": query}]
    turns = []
    for part in _TURN_BREAK.split(query):
        speaker, _, content = part.partition(": ")
        turns.append({"role": "user" if speaker == "User" else "assistant", "content": content})
    if turns[-1]["role"] != "user":
        return [{"role": "user", "content": query}]
    return turns


def as_turn(reply: str) -> str:
    """A generated reply as one assistant turn of `conversation_query`: a blank line before "User: " or
    "Assistant: " inside it would read back as a new turn, so it is closed to one line break."""
    return _TURN_BREAK.sub("\n", reply.strip())


def users_side(query: str) -> str:
    """A query's users' turns alone: the key under which a conversation is the same whoever gave its earlier
    replies (the logs or the policy, `--history policy`); a one-turn query is itself."""
    turns = conversation_of(query)
    return query if len(turns) == 1 else "\n\n".join(t["content"] for t in turns if t["role"] == "user")


def generator_prompt(query: str, behavior_text: str | None = None) -> str:
    """The plain format's prompt; the response follows it after one space."""
    lines = [f"Question: {_clip(query, MAX_QUERY_CHARS)}"]
    if behavior_text is not None:
        lines.append(f"Users: {behavior_text}")
    lines.append("Answer:")
    return "\n".join(lines)


def chat_messages(query: str, behavior_text: str | None = None) -> list[dict]:
    """The chat format's turns: the condition as the system's instruction, the query as the user's."""
    messages = []
    if behavior_text is not None:
        messages.append({"role": "system", "content": f"Answer so that users react like this: {behavior_text}."})
    messages.append({"role": "user", "content": _clip(query, MAX_QUERY_CHARS)})
    return messages


@dataclass
class PromptFormat:
    """How a policy is prompted and how its answer follows the prompt (`tokenizer` renders chat turns)."""

    kind: str = "plain"
    tokenizer: object = None

    @classmethod
    def resolve(cls, asked: str, tokenizer, where: str | Path, built_here: bool = False) -> "PromptFormat":
        """`asked` (auto, plain or chat) for a model whose tokenizer is `tokenizer`: auto is chat when the model
        came with a chat template and was not built here (the tiny model's template is not what it learns)."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if asked == "auto":
            asked = "chat" if has_template and not built_here else "plain"
        if asked not in PROMPT_FORMATS:
            raise RlhbError(f"prompt format must be auto, plain or chat, got {asked!r}")
        if asked == "chat" and not has_template:
            raise RlhbError(f"{where}: the model's tokenizer has no chat template; use --prompt-format plain")
        return cls(asked, tokenizer)

    @classmethod
    def of_policy(cls, meta: dict, tokenizer, where: str | Path) -> "PromptFormat":
        """The format a policy was trained with (its policy.json; plain when it says nothing)."""
        return cls.resolve(meta.get("prompt_format", "plain"), tokenizer, where)

    def prompt(self, query: str, behavior_text: str | None = None) -> str:
        """The prompt for a query; a conversation query (see the module) as its conversation's turns."""
        turns = conversation_of(query)
        if len(turns) > 1:
            return self.conversation_prompt(turns, behavior_text)
        if self.kind == "plain":
            return generator_prompt(query, behavior_text)
        return self.tokenizer.apply_chat_template(chat_messages(query, behavior_text), tokenize=False,
                                                  add_generation_prompt=True)

    def conversation_prompt(self, messages: list[dict], behavior_text: str | None = None) -> str:
        """The prompt for the next reply of a conversation (its turns so far, the user's last): in the plain
        format each earlier turn as Question / Answer lines, so that a one-message conversation is exactly
        `prompt(query, behavior_text)`; in the chat format the template's own turns under the condition."""
        if not messages or messages[-1]["role"] != "user":
            raise RlhbError("a conversation's prompt ends with the user's message")
        if self.kind == "plain":
            earlier = [f"{'Question' if m['role'] == 'user' else 'Answer'}: "
                       f"{_clip(m['content'], MAX_QUERY_CHARS if m['role'] == 'user' else MAX_RESPONSE_CHARS)}"
                       for m in messages[:-1]]
            return "\n".join(earlier + [generator_prompt(messages[-1]["content"], behavior_text)])
        turns = chat_messages(messages[-1]["content"], behavior_text)
        history = [{"role": m["role"], "content": _clip(m["content"], MAX_RESPONSE_CHARS)} for m in messages[:-1]]
        return self.tokenizer.apply_chat_template(turns[:-1] + history + turns[-1:], tokenize=False,
                                                  add_generation_prompt=True)

    def completion(self, response: str) -> str:
        """The text that follows the prompt for `response` (before the EOS the trainer or scorer adds)."""
        return (" " + response) if self.kind == "plain" else response


def policy_meta(policy_dir: Path) -> dict:
    """How a policy is prompted: its policy.json. Without one: a run's SFT policy made before policy.json
    recorded the format (plain, the only one then), or a model from outside the run (its chat template if
    it has one), each asked for the most preferred behaviour."""
    path = Path(policy_dir) / "policy.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    in_a_run = (Path(policy_dir).parent / "manifest.json").exists()
    return {"condition": "most_preferred", "prompt_format": "plain" if in_a_run else "auto"}


def policy_condition(meta: dict, default: str | None = None) -> str | None:
    """The behaviour a policy is asked for: its policy.json's (`default` when it names none), or None for a
    policy trained without one (`--condition none`, a DPO policy)."""
    return None if meta.get("condition") == "none" else meta.get("behavior_text", default)


def judge_text(query: str, response: str, behavior_text: str | None = None) -> str:
    """What a judge reads: the behaviour first (never cut), then the question, then the answer."""
    lines = []
    if behavior_text is not None:
        lines.append(f"Users: {behavior_text}")
    conversation = len(conversation_of(query)) > 1
    lines.append(f"Question: {(_clip_start if conversation else _clip)(query, MAX_QUERY_CHARS)}")
    lines.append(f"Answer: {_clip(response, MAX_RESPONSE_CHARS)}")
    return "\n".join(lines)
