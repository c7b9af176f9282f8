"""Turn planning on chat dicts (the protocol of METHOD.md, as in training): what is written into memory, and
what goes into the read prompt. Framework-free; ``deltamem_agents.agents.turn`` adapts LangChain messages.

older   = messages before the newest user message (system messages excluded: they stay in every prompt)
write   = older messages whose id is not yet in ``written``, in order  -> the write schedule
window  = the newest messages (at least everything from the newest user message on), counted in messages
          and capped in tokens; a window starts with a user message (``WindowPolicy.start_on_user``; never with a
          tool result whose call was cut off)
notes   = (recall="latent+retrieval") BM25 matches among older messages outside the window, token-capped; only
          messages of ``WindowPolicy.note_roles`` (the user's, by default)
prompt  = :func:`build_read_prompt`: system (+ notes, + tool instructions) + window; the chat and the recall
          evaluation both build their read prompts with it
"""

from dataclasses import dataclass

from deltamem_agents.core.errors import MessageError
from deltamem_agents.serving.prompts import NOTES_HEADER
from deltamem_agents.serving.retrieval import retrieve_notes

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
        note_roles: the roles whose older messages may become notes. By default only what the user said: a
            small model copies a recalled reply of its own into the new one, and an old tool result is stale
            (a ticket "open" on Monday is "waiting for parts" on Wednesday); docs/design-choices.md. The
            memory still holds every message.
        start_on_user: the window starts with a user message (older messages before the first one in it are
            left to the memory and the notes), as LangChain's ``trim_messages(start_on="human")``.
    """

    messages: int = 4
    max_tokens: int = 768
    recall: str = "latent+retrieval"
    notes_tokens: int = 192
    max_notes: int = 3
    note_roles: tuple[str, ...] = ("user",)
    start_on_user: bool = True

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


def build_read_prompt(
    system_texts: list[str], notes: list[str], window: list[dict], extra_system: str = ""
) -> list[dict]:
    """The read prompt: one system message (the system texts, then the notes under ``NOTES_HEADER``, then
    ``extra_system``), followed by the window's chat dicts. No system message when all of that is empty."""
    system_text = "\n\n".join(system_texts)
    if notes:
        system_text += "\n\n" + NOTES_HEADER + "\n" + "\n".join(f"- {n}" for n in notes)
    if extra_system:
        system_text += "\n\n" + extra_system
    system_text = system_text.strip()
    return ([{"role": "system", "content": system_text}] if system_text else []) + list(window)


def plan_chat_turn(
    chat: list[dict],
    ids: list[str],
    written: tuple[str, ...] | list[str],
    policy: WindowPolicy,
    count_tokens,
    extra_system: str = "",
) -> TurnPlan:
    """Plan one turn over chat dicts with their message ids (see the module docstring)."""
    users = [i for i, m in enumerate(chat) if m["role"] == "user"]
    if not users:
        raise MessageError("no user (human) message: a turn answers the newest user message")
    newest_user = users[-1]
    seen = set(written)
    older = [i for i in range(newest_user) if chat[i]["role"] != "system"]
    to_write = [i for i in older if ids[i] not in seen]
    watermark = tuple(written) + tuple(ids[i] for i in to_write)

    conversation = [i for i in range(len(chat)) if chat[i]["role"] != "system"]
    tail = [i for i in conversation if i >= newest_user]
    before = [i for i in conversation if i < newest_user]
    room = max(policy.messages - len(tail), 0)
    window = (before[-room:] if room else []) + tail
    window, shown = _cap_window(window, tail, chat, policy.max_tokens, count_tokens)
    while window and window[0] not in tail and _cut_start(chat[window[0]]["role"], policy):
        window = window[1:]

    notes: list[str] = []
    if policy.recall == "latent+retrieval":
        outside = [i for i in older if i not in window and chat[i]["role"] in policy.note_roles]
        found = retrieve_notes(
            [(chat[i]["role"], chat[i]["content"]) for i in outside],
            chat[newest_user]["content"],
            count_tokens,
            max_tokens=policy.notes_tokens,
            max_notes=policy.max_notes,
        )
        notes = [f"{n.role}: {n.text}" for n in found]
    systems = [m["content"] for m in chat if m["role"] == "system"]
    prompt = build_read_prompt(systems, notes, [shown[i] for i in window], extra_system)
    return TurnPlan(to_write=[chat[i] for i in to_write], written_ids=watermark, prompt=prompt, notes=notes)


def _cut_start(role: str, policy: WindowPolicy) -> bool:
    """Whether a window may not start with a message of ``role``: never with a tool result (its call was cut
    off), and with ``start_on_user`` only with a user message (an assistant reply or call whose request was cut
    off reads as if the assistant spoke unprompted, and a small model copies it into the new reply)."""
    return role == "tool" or (policy.start_on_user and role != "user")


def _cap_window(
    window: list[int], tail: list[int], chat: list[dict], max_tokens: int, count_tokens
) -> tuple[list[int], dict[int, dict]]:
    """Drop the oldest window messages until the window fits ``max_tokens``. If the current turn alone (the
    newest user message and what follows: tool calls and results) is still too long, cut its longest messages:
    tool results and replies keep their beginning, the user message its end. ``chat`` is not changed: the
    shown (possibly cut) messages are returned beside the window, and the full texts are what gets written into
    memory at the next turn."""
    shown = {i: chat[i] for i in window}
    costs = {i: count_tokens(chat[i]["content"]) + 4 for i in window}
    while sum(costs[i] for i in window) > max_tokens and window[0] not in tail:
        window = window[1:]
    overflow = sum(costs[i] for i in window) - max_tokens
    while overflow > 0:
        longest = max(window, key=lambda i: costs[i])
        target = max(costs[longest] - 4 - overflow, 8)
        shorter = _cut(shown[longest], target, count_tokens)
        cost = count_tokens(shorter) + 4
        if cost >= costs[longest]:
            break  # nothing left to cut: the prompt is then bounded by the context limit of the engine
        shown[longest] = {**shown[longest], "content": shorter}
        costs[longest] = cost
        overflow = sum(costs[i] for i in window) - max_tokens
    return window, shown


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
