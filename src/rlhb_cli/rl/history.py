"""Conversations whose earlier replies are the policy's own (`--history policy`, issue 28 item 4).

A conversation log's query holds the replies the platform showed; a policy trained only on those learns to
answer after another model's turns. With `--history policy` the engine regenerates each earlier reply with
the current policy, turn by turn (the second reply sees the policy's first), before the reply it trains on;
the users' turns stay as logged. The users' later turns were written after the logged replies, so a remark
("a bit long for me") may answer a reply the policy did not give: the simulator's interactive evaluation
(`evaluate-personalization`) is where a persona answers the policy itself.
"""

from __future__ import annotations

from typing import Callable

from rlhb_cli.prompts import as_turn, conversation_of, conversation_query

HISTORY = ("logs", "policy")


def with_policy_history(queries: list[str], behaviors: list[str | None],
                        reply: Callable[[list[list[dict]], list[str | None]], list[str]]) -> list[str]:
    """`queries` with every earlier assistant turn replaced by the policy's reply to the conversation before
    it, depth by depth so that each batch holds every conversation's next turn. `reply(conversations,
    behaviors)` answers conversations that end with the user's turn. A one-turn query is returned as is."""
    turns = [conversation_of(q) for q in queries]
    slots = [[i for i, t in enumerate(ts[:-1]) if t["role"] == "assistant"] for ts in turns]
    for depth in range(max((len(s) for s in slots), default=0)):
        todo = [(n, s[depth]) for n, s in enumerate(slots) if len(s) > depth]
        answers = reply([turns[n][:at] for n, at in todo], [behaviors[n] for n, _ in todo])
        for (n, at), answer in zip(todo, answers):
            turns[n][at] = {"role": "assistant", "content": as_turn(answer)}
    return [conversation_query(ts) if s else q for q, ts, s in zip(queries, turns, slots)]
