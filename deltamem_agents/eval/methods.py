"""The compared methods, all on the same backbone. Each builds a prompt (messages) and says which memory the
read pass uses: none (exactly the backbone: an empty state with writes off reads 0), the conversation's own
δ-mem state, or ANOTHER conversation's state (the control)."""

from dataclasses import dataclass

from deltamem_agents.eval.tasks import EvalConversation
from deltamem_agents.serving.retrieval import retrieve_notes


@dataclass(frozen=True)
class Method:
    """``memory``: None, ``own`` or ``other``; ``history``: ``window`` or ``full``; ``notes``: BM25 notes."""

    name: str
    memory: str | None
    history: str
    notes: bool
    description: str


METHODS = {
    m.name: m
    for m in (
        Method("window", None, "window", False, "no memory: system + last messages (window) + question"),
        Method("full", None, "full", False, "full history replay in the prompt (most recent part that fits)"),
        Method("bm25", None, "window", True, "BM25 notes of older messages in the prompt + window"),
        Method("delta", "own", "window", False, "δ-mem state of the conversation + window"),
        Method("delta_bm25", "own", "window", True, "δ-mem state + BM25 notes + window"),
        Method("delta_control", "other", "window", False, "control: ANOTHER conversation's δ-mem state + window"),
    )
}
MEMORY_METHODS = tuple(name for name, m in METHODS.items() if m.memory)


def build_prompt(
    method: Method,
    conversation: EvalConversation,
    question: str,
    system_prompt: str,
    count_tokens,
    window: int = 2,
    max_prompt_tokens: int = 2048,
    note_tokens: int = 256,
) -> list[dict]:
    """The read-pass messages of ``method`` for one question."""
    system = system_prompt
    recent = list(conversation.notes[-window:]) if window > 0 else []
    if method.notes:
        older = list(conversation.notes[: len(conversation.notes) - len(recent)])
        notes = retrieve_notes(older, question, count_tokens, max_tokens=note_tokens)
        if notes:
            system += "\nNotes from earlier in this conversation:\n" + "\n".join(f"- {n.text}" for n in notes)
    messages = [{"role": "system", "content": system}]
    if method.history == "full":
        budget = max_prompt_tokens - count_tokens(system) - count_tokens(question) - 16
        kept = []
        for message in reversed(conversation.messages):
            cost = count_tokens(message["content"]) + 4
            if cost > budget:
                break
            kept.append(dict(message))
            budget -= cost
        messages += list(reversed(kept))
    else:
        messages += [{"role": role, "content": text} for role, text in recent]
    messages.append({"role": "user", "content": question})
    return messages
