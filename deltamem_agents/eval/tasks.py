"""Evaluation tasks as conversations with questions: ``synthetic`` (our held-out test split) and ``locomo``
(the LoCoMo JSON, read from where it lies; never copied)."""

import json
from dataclasses import dataclass
from pathlib import Path

from deltamem_agents.core.errors import DeltaMemError
from deltamem_agents.train.closed_facts import closed_facts_test
from deltamem_agents.train.synthetic import SyntheticEpisodes

TEMPORAL_SUFFIX = " Use DATE of CONVERSATION to answer with an approximate date."


@dataclass(frozen=True)
class EvalQuestion:
    question: str
    answer: str
    category: int | None = None


@dataclass(frozen=True)
class EvalConversation:
    """A conversation to remember: ``messages`` (role/content dicts, in order) is what gets written / replayed;
    ``notes`` are the retrievable units for BM25 (role, text)."""

    id: str
    messages: tuple[dict, ...]
    notes: tuple[tuple[str, str], ...]
    questions: tuple[EvalQuestion, ...]


def synthetic_task(count: int = 50, level: int = 3, split_seed: int = 0, split: str = "test") -> list[EvalConversation]:
    """``count`` episodes of the synthetic ``split`` (test by default) at curriculum ``level``."""
    return episode_conversations(SyntheticEpisodes(split, split_seed).episodes(count, level, seed=12345))


def closed_task(half: str = "tune") -> list[EvalConversation]:
    """Rung 1, closed facts: the fixed test set of ``deltamem_agents.train.closed_facts`` (``tune`` or
    ``report`` half; templates and small talk never used in training)."""
    return episode_conversations(closed_facts_test(half))


def episode_conversations(episodes) -> list[EvalConversation]:
    """Episodes as evaluation conversations: the history is written / replayed, every message is a BM25 note."""
    conversations = []
    for e in episodes:
        history = tuple(e.history())
        conversations.append(
            EvalConversation(
                id=e.id,
                messages=history,
                notes=tuple((m["role"], m["content"]) for m in history),
                questions=tuple(EvalQuestion(q.question, q.answer, None) for q in e.questions),
            )
        )
    return conversations


def locomo_task(path: str, include_adversarial: bool = False) -> list[EvalConversation]:
    """LoCoMo conversations: each session is one user message, its date followed by lines
    ``Speaker said, "text"`` (plus the image caption); BM25 notes are single turns with their session date.
    Category 5 (adversarial) is excluded unless asked; category 2 questions get the temporal suffix."""
    file = Path(path)
    if not file.is_file():
        raise DeltaMemError(f"no LoCoMo file at {path}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DeltaMemError(f"{path} is not valid JSON: {err}") from None
    conversations = []
    for sample in data:
        conv = sample["conversation"]
        indices = sorted(int(k.split("_")[1]) for k in conv if k.startswith("session_") and not k.endswith("date_time"))
        messages, notes = [], []
        for i in indices:
            date = conv.get(f"session_{i}_date_time", "")
            lines = [f"DATE: {date}"]
            for turn in conv[f"session_{i}"]:
                text = turn["text"]
                if turn.get("blip_caption"):
                    text += f" [shares {turn['blip_caption']}]"
                line = f'{turn["speaker"]} said, "{text}"'
                lines.append(line)
                notes.append(("user", f"({date}) {line}"))
            messages.append({"role": "user", "content": "\n".join(lines)})
        questions = []
        for qa in sample["qa"]:
            category = int(qa.get("category", 0))
            if category == 5 and not include_adversarial:
                continue
            question = qa["question"] + (TEMPORAL_SUFFIX if category == 2 else "")
            questions.append(EvalQuestion(question, str(qa.get("answer", "")), category))
        conversations.append(
            EvalConversation(
                str(sample.get("sample_id", len(conversations))), tuple(messages), tuple(notes), tuple(questions)
            )
        )
    return conversations
