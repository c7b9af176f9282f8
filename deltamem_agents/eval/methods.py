"""The compared methods, all on the same backbone. Each builds a prompt (messages) and says which memory the
read pass uses: none (exactly the backbone: an empty state with writes off reads 0), the conversation's own
δ-mem state, or ANOTHER conversation's state (the control)."""

from dataclasses import dataclass

from deltamem_agents.eval.tasks import EvalConversation
from deltamem_agents.serving.retrieval import retrieve_notes
from deltamem_agents.serving.turn_plan import build_read_prompt


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
    """The read-pass messages of ``method`` for one question, built like the chat's (``build_read_prompt``)."""
    recent = list(conversation.notes[-window:]) if window > 0 else []
    notes = []
    if method.notes:
        older = list(conversation.notes[: len(conversation.notes) - len(recent)])
        notes = [f"{n.role}: {n.text}" for n in retrieve_notes(older, question, count_tokens, max_tokens=note_tokens)]
    if method.history == "full":
        budget = max_prompt_tokens - count_tokens(system_prompt) - count_tokens(question) - 16
        kept = []
        for message in reversed(conversation.messages):
            cost = count_tokens(message["content"]) + 4
            if cost > budget:
                break
            kept.append(dict(message))
            budget -= cost
        history = list(reversed(kept))
    else:
        history = [{"role": role, "content": text} for role, text in recent]
    return build_read_prompt([system_prompt], notes, [*history, {"role": "user", "content": question}])
