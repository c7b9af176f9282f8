"""The JSONL episode format: multi-session conversations with questions and answers, plus its loader.

One JSON object per line::

    {"id": "syn-train-000001",
     "split": "train",
     "sessions": [{"date": "2024-03-01", "messages": [{"role": "user", "content": "..."},
                                                      {"role": "assistant", "content": "..."}]}, ...],
     "questions": [{"question": "What is my sister's name?", "answer": "Maren", "kind": "fact",
                    "evidence": [[0, 2]], "category": null}]}

``sessions`` are in time order; ``messages`` use the chat roles ``user`` / ``assistant`` (no system messages: the
system prompt is the task's). Every question is asked AFTER the last session, as a new user message.
``evidence`` lists ``[session, message]`` positions that state the answer (optional; used to check the data and
for the curriculum). ``category`` is free (LoCoMo's 1-5 when converted from LoCoMo).
"""

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltamem_agents.core.errors import DeltaMemError

ROLES = ("user", "assistant")


class EpisodeFormatError(DeltaMemError):
    """An episode file or object does not follow the documented JSONL format."""


@dataclass(frozen=True)
class Question:
    """A question asked after the last session, with its reference answer."""

    question: str
    answer: str
    kind: str = "fact"
    evidence: tuple[tuple[int, int], ...] = ()
    category: int | None = None


@dataclass(frozen=True)
class Session:
    """One session of a conversation: a date label and its messages (dicts with ``role`` and ``content``)."""

    messages: tuple[dict, ...]
    date: str = ""


@dataclass(frozen=True)
class Episode:
    """A multi-session conversation and the questions asked after it."""

    id: str
    sessions: tuple[Session, ...]
    questions: tuple[Question, ...]
    split: str = "train"
    meta: dict = field(default_factory=dict)

    def history(self) -> list[dict]:
        """All messages of all sessions, in order (the write pass's input, without a system message)."""
        return [dict(m) for s in self.sessions for m in s.messages]

    def to_json(self) -> dict:
        data = asdict(self)
        for q in data["questions"]:
            q["evidence"] = [list(e) for e in q["evidence"]]
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = "episode") -> "Episode":
        """Validate and build an Episode from a decoded JSON object; raises EpisodeFormatError with ``where``."""
        if not isinstance(data, dict):
            raise EpisodeFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for key in ("id", "sessions", "questions"):
            if key not in data:
                raise EpisodeFormatError(f"{where}: missing field {key!r}")
        sessions = []
        for i, raw in enumerate(data["sessions"]):
            if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
                raise EpisodeFormatError(f"{where}: sessions[{i}] needs a 'messages' list")
            for j, m in enumerate(raw["messages"]):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise EpisodeFormatError(
                        f"{where}: sessions[{i}].messages[{j}] must be {{'role': 'user'|'assistant', 'content': str}}"
                    )
            messages = tuple({"role": m["role"], "content": m["content"]} for m in raw["messages"])
            sessions.append(Session(messages=messages, date=str(raw.get("date", ""))))
        questions = []
        for i, raw in enumerate(data["questions"]):
            if not isinstance(raw, dict) or not isinstance(raw.get("question"), str) or "answer" not in raw:
                raise EpisodeFormatError(f"{where}: questions[{i}] needs 'question' (str) and 'answer'")
            evidence = tuple(tuple(int(x) for x in e) for e in raw.get("evidence", ()))
            questions.append(
                Question(
                    question=raw["question"],
                    answer=str(raw["answer"]),
                    kind=str(raw.get("kind", "fact")),
                    evidence=evidence,
                    category=raw.get("category"),
                )
            )
        if not questions:
            raise EpisodeFormatError(f"{where}: an episode needs at least one question")
        return cls(
            id=str(data["id"]),
            sessions=tuple(sessions),
            questions=tuple(questions),
            split=str(data.get("split", "train")),
            meta=dict(data.get("meta", {})),
        )


def save_episodes(episodes: Iterable[Episode], path: str | os.PathLike) -> Path:
    """Write episodes as JSONL (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for episode in episodes:
            handle.write(json.dumps(episode.to_json(), ensure_ascii=False) + "\n")
    return path


def load_episodes(path: str | os.PathLike) -> list[Episode]:
    """Read a JSONL episode file; a malformed line raises EpisodeFormatError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise EpisodeFormatError(f"no episode file at {path}")
    episodes = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise EpisodeFormatError(f"{path}:{number}: not valid JSON: {err}") from None
            episodes.append(Episode.from_json(data, where=f"{path}:{number}"))
    return episodes
