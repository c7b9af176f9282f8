"""The turn protocol (METHOD.md, as in training): what is written into memory, and what goes into the prompt.

older   = messages before the newest user message (system messages excluded: they stay in every prompt)
write   = older messages whose id is not yet in ``written``, in order  -> one write pass
window  = the newest messages (at least everything from the newest user message on), counted in messages
          and capped in tokens; no window starts with a tool result whose call was cut off
notes   = (recall="latent+retrieval") BM25 matches among older messages outside the window, token-capped
prompt  = system (+ notes, + tool instructions) + window + generation prompt
"""

import hashlib
from dataclasses import dataclass

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from deltamem_agents.core.errors import MessageError
from deltamem_agents.serving.retrieval import retrieve_notes
from deltamem_agents.serving.tool_grammar import render_tool_call

RECALL_MODES = ("latent", "latent+retrieval")


@dataclass(frozen=True)
class WindowPolicy:
    """How much of the conversation the prompt holds besides the memory.

    Attributes:
        messages: the newest messages kept in the prompt (at least the newest user message and what follows).
        max_tokens: token cap of the window; the oldest window messages go first, then the newest user message
            is cut from the left.
        recall: ``latent`` (memory only) or ``latent+retrieval`` (memory plus BM25 notes from this thread).
        notes_tokens: token cap of the retrieved notes.
        max_notes: at most this many notes.
    """

    messages: int = 4
    max_tokens: int = 768
    recall: str = "latent+retrieval"
    notes_tokens: int = 192
    max_notes: int = 3

    def __post_init__(self):
        if self.recall not in RECALL_MODES:
            raise MessageError(f"recall must be one of {RECALL_MODES}, got {self.recall!r}")
        if self.messages < 1 or self.max_tokens < 16:
            raise MessageError("window needs messages >= 1 and max_tokens >= 16")


@dataclass(frozen=True)
class TurnPlan:
    """Result of planning one turn."""

    to_write: list[dict]  # chat dicts to write, in order
    written_ids: tuple[str, ...]  # the watermark after this turn's write pass
    prompt: list[dict]  # chat dicts of the read pass (system + window)
    notes: list[str]


def message_id(message: BaseMessage, position: int, messages: list[BaseMessage]) -> str:
    """The message's own id, or (for messages without one) a content hash disambiguated by how many identical
    messages came before it, so the id survives appends and does not depend on the list length."""
    if message.id:
        return str(message.id)
    key = (message.type, _text(message))
    repeat = sum(1 for m in messages[:position] if not m.id and (m.type, _text(m)) == key)
    digest = hashlib.sha256(f"{key[0]}\0{key[1]}\0{repeat}".encode()).hexdigest()[:16]
    return f"content:{digest}"


def to_chat_dict(message: BaseMessage) -> dict:
    """One LangChain message as a chat-template dict (tool calls rendered as our JSON envelope)."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": _text(message)}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": _text(message)}
    if isinstance(message, AIMessage):
        parts = [_text(message)] if _text(message) else []
        parts += [render_tool_call(call) for call in message.tool_calls]
        return {"role": "assistant", "content": "\n".join(parts)}
    if isinstance(message, ToolMessage):
        return {"role": "tool", "content": _text(message)}
    raise MessageError(
        f"unsupported message type {type(message).__name__} (role {getattr(message, 'type', '?')!r}); use "
        "SystemMessage, HumanMessage, AIMessage or ToolMessage"
    )


def plan_turn(
    messages: list[BaseMessage],
    written: tuple[str, ...] | list[str],
    policy: WindowPolicy,
    count_tokens,
    extra_system: str = "",
) -> TurnPlan:
    """Plan one turn: which messages to write and the prompt of the read pass (see the module docstring)."""
    if not messages:
        raise MessageError("no messages: a turn needs at least one user message")
    chat = [to_chat_dict(m) for m in messages]  # validates every role
    users = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    if not users:
        raise MessageError("no user (human) message: a turn answers the newest user message")
    newest_user = users[-1]
    ids = [message_id(m, i, messages) for i, m in enumerate(messages)]
    seen = set(written)
    older = [i for i in range(newest_user) if not isinstance(messages[i], SystemMessage)]
    to_write = [i for i in older if ids[i] not in seen]
    watermark = tuple(written) + tuple(ids[i] for i in to_write)

    conversation = [i for i in range(len(messages)) if not isinstance(messages[i], SystemMessage)]
    tail = [i for i in conversation if i >= newest_user]
    before = [i for i in conversation if i < newest_user]
    room = max(policy.messages - len(tail), 0)
    window = (before[-room:] if room else []) + tail
    window = _cap_window(window, tail, chat, policy.max_tokens, count_tokens)
    while window and chat[window[0]]["role"] == "tool" and window[0] not in tail:
        window = window[1:]

    notes: list[str] = []
    if policy.recall == "latent+retrieval":
        outside = [i for i in older if i not in window]
        found = retrieve_notes(
            [(chat[i]["role"], chat[i]["content"]) for i in outside],
            chat[newest_user]["content"],
            count_tokens,
            max_tokens=policy.notes_tokens,
            max_notes=policy.max_notes,
        )
        notes = [f"{n.role}: {n.text}" for n in found]
    system_text = "\n\n".join(chat[i]["content"] for i in range(len(messages)) if chat[i]["role"] == "system")
    if notes:
        system_text += "\n\nNotes from earlier in this conversation:\n" + "\n".join(f"- {n}" for n in notes)
    if extra_system:
        system_text += "\n\n" + extra_system
    prompt = ([{"role": "system", "content": system_text.strip()}] if system_text.strip() else []) + [
        chat[i] for i in window
    ]
    return TurnPlan(to_write=[chat[i] for i in to_write], written_ids=watermark, prompt=prompt, notes=notes)


def _cap_window(window: list[int], tail: list[int], chat: list[dict], max_tokens: int, count_tokens) -> list[int]:
    """Drop the oldest window messages until the window fits ``max_tokens``. If the current turn alone (the
    newest user message and what follows: tool calls and results) is still too long, cut its longest messages:
    tool results and replies keep their beginning, the user message its end. The full texts stay in the state
    and are written into memory at the next turn."""
    costs = {i: count_tokens(chat[i]["content"]) + 4 for i in window}
    while sum(costs[i] for i in window) > max_tokens and window[0] not in tail:
        window = window[1:]
    overflow = sum(costs[i] for i in window) - max_tokens
    while overflow > 0:
        longest = max(window, key=lambda i: costs[i])
        target = max(costs[longest] - 4 - overflow, 8)
        shorter = _cut(chat[longest], target, count_tokens)
        cost = count_tokens(shorter) + 4
        if cost >= costs[longest]:
            break  # nothing left to cut: the prompt is then bounded by the context limit of the engine
        chat[longest] = {**chat[longest], "content": shorter}
        costs[longest] = cost
        overflow = sum(costs[i] for i in window) - max_tokens
    return window


def _cut(message: dict, budget: int, count_tokens) -> str:
    """The message text cut to about ``budget`` tokens, on word boundaries (binary search)."""
    words = message["content"].split()
    keep_end = message["role"] == "user"
    marker = "[…]"
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = words[-mid:] if keep_end else words[:mid]
        if count_tokens(" ".join(part)) + 2 <= budget:
            lo = mid
        else:
            hi = mid - 1
    part = words[-lo:] if keep_end and lo else words[:lo]
    if not part:  # one giant word: cut characters
        text = message["content"]
        part = [text[-budget:] if keep_end else text[:budget]]
    return f"{marker} {' '.join(part)}" if keep_end else f"{' '.join(part)} {marker}"


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content)
