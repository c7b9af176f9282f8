"""LangChain messages into the turn protocol of ``deltamem_agents.serving.turn_plan``: message ids, chat dicts."""

import hashlib

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from deltamem_agents.core.errors import MessageError
from deltamem_agents.serving.tool_grammar import render_tool_call
from deltamem_agents.serving.turn_plan import RECALL_MODES, TurnPlan, WindowPolicy, plan_chat_turn

__all__ = [
    "RECALL_MODES",
    "MessageError",
    "TurnPlan",
    "WindowPolicy",
    "message_id",
    "messages_in_memory",
    "plan_turn",
    "to_chat_dict",
]


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


def messages_in_memory(messages: list[BaseMessage]) -> int:
    """How many messages the memory of a turn on ``messages`` holds: the non-system ones before the newest user
    message (what the turn's write pass has written)."""
    users = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    return sum(1 for m in messages[: users[-1] if users else 0] if not isinstance(m, SystemMessage))


def plan_turn(
    messages: list[BaseMessage],
    written: tuple[str, ...] | list[str],
    policy: WindowPolicy,
    count_tokens,
    extra_system: str = "",
) -> TurnPlan:
    """Plan one turn of LangChain messages: which to write and the read prompt (see ``serving.turn_plan``)."""
    if not messages:
        raise MessageError("no messages: a turn needs at least one user message")
    chat = [to_chat_dict(m) for m in messages]  # validates every role
    ids = [message_id(m, i, messages) for i, m in enumerate(messages)]
    return plan_chat_turn(chat, ids, written, policy, count_tokens, extra_system)


def _text(message: BaseMessage) -> str:
    """The message's text. Content blocks other than text (images, audio, files, ...) raise MessageError: the
    backbone reads text only, and dropping them silently would answer a question that was not asked."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            kind = part.get("type", "?") if isinstance(part, dict) else type(part).__name__
            raise MessageError(
                f"a {message.type} message holds a {kind!r} content block; DeltaMemChat reads text only: remove "
                "the block, or put what it shows into the message as text"
            )
    return "".join(parts)
