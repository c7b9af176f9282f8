"""Episode -> token tensors for training: the write pass (the history under the write schedule: one piece per
message, the chat's own rendering) and the read pass (system + question + answer, labels on the answer tokens
only), batches grouped by length."""

import random
from dataclasses import dataclass

import torch

from deltamem_agents.serving import write_schedule
from deltamem_agents.serving.prompts import SYSTEM_PROMPT
from deltamem_agents.serving.retrieval import retrieve_notes
from deltamem_agents.serving.templating import render_prompt_ids
from deltamem_agents.serving.turn_plan import build_read_prompt
from deltamem_agents.serving.write_schedule import WriteCall
from deltamem_agents.train.episodes import Episode

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training example: ``write_pieces`` the ``(T,)`` ids of each write call of the history, in order;
    ``read_ids`` (Tr,), ``labels`` (Tr,) with IGNORE outside the answer."""

    write_pieces: tuple[torch.Tensor, ...]
    read_ids: torch.Tensor
    labels: torch.Tensor
    episode_id: str = ""
    answer_in_prompt: bool = False
    teacher_ids: torch.Tensor | None = None  # (Tt,) the read ids with the fact-holding messages in the prompt
    teacher_labels: torch.Tensor | None = None  # (Tt,)

    @property
    def write_tokens(self) -> int:
        return sum(int(p.shape[0]) for p in self.write_pieces)

    @property
    def cost(self) -> int:
        return self.write_tokens + int(self.read_ids.shape[0])


@dataclass(frozen=True)
class Batch:
    """B examples: the write calls of their histories (batched by the schedule) and right-padded read tensors.
    Masks are true on real tokens."""

    write_calls: tuple[WriteCall, ...]
    read_ids: torch.Tensor  # (B, Tr)
    read_mask: torch.Tensor  # (B, Tr)
    labels: torch.Tensor  # (B, Tr)
    in_prompt: torch.Tensor | None = None  # (B,) true where the read prompt itself holds the answer
    teacher: "Batch | None" = None  # the teacher's read tensors (no write calls), for context distillation

    @property
    def size(self) -> int:
        return self.read_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(sum(int(c.mask.sum()) for c in self.write_calls) + self.read_mask.sum())

    def to(self, device) -> "Batch":
        moved = None if self.in_prompt is None else self.in_prompt.to(device)
        teacher = None if self.teacher is None else self.teacher.to(device)
        return Batch(
            self.write_calls,
            self.read_ids.to(device),
            self.read_mask.to(device),
            self.labels.to(device),
            moved,
            teacher,
        )

    def reads_twice(self) -> "Batch":
        """The read tensors stacked twice (B -> 2B), for the right- and wrong-memory reads in one pass."""
        return Batch(
            self.write_calls,
            torch.cat([self.read_ids] * 2),
            torch.cat([self.read_mask] * 2),
            torch.cat([self.labels] * 2),
            None if self.in_prompt is None else torch.cat([self.in_prompt] * 2),
        )


def read_prompt(
    question: str, system_prompt: str = SYSTEM_PROMPT, window: list[dict] = (), notes: list[str] = ()
) -> list[dict]:
    """The read pass's messages before the answer, built by the chat's builder: the system prompt (with the notes,
    if any), the window of recent messages and the question."""
    return build_read_prompt([system_prompt], list(notes), [*window, {"role": "user", "content": question}])


def encode_example(
    tokenizer,
    episode: Episode,
    question_index: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
    max_write_tokens=2048,
    window: int = 0,
    notes: bool = False,
    teacher: bool = False,
) -> Example:
    """Tokenize one (episode, question) pair. The history is written as the chat writes it; when it is longer
    than ``max_write_tokens``, its oldest messages are left out (whole messages, so the state stays a function of
    the written messages). ``window``: the last messages of the history in the read prompt; ``notes``: BM25 notes
    of the older messages too (as ``deltamem eval``'s window / bm25 methods build them). ``teacher``: also the
    teacher's read ids, the same prompt with the messages that state the answer (the question's ``evidence``
    and the reply after each) put before the window: context distillation's teacher sees the fact."""
    question = episode.questions[question_index]
    messages = episode.history()
    recent = messages[-window:] if window else []
    note_lines = []
    if notes:
        older = [(m["role"], m["content"]) for m in messages[: len(messages) - len(recent)]]
        note_lines = [f"{n.role}: {n.text}" for n in retrieve_notes(older, question.question, _count(tokenizer), 256)]
    pieces = write_schedule.message_pieces(tokenizer, messages)
    while len(messages) > 1 and sum(int(p.shape[0]) for p in pieces) > max_write_tokens:
        messages = messages[1:]
        pieces = write_schedule.message_pieces(tokenizer, messages)
    prompt = read_prompt(question.question, system_prompt, [dict(m) for m in recent], note_lines)
    prompt_ids = render_prompt_ids(tokenizer, prompt).tolist()
    answer_ids = tokenizer(question.answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    read_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)  # (Tr,)
    labels = torch.tensor([IGNORE] * len(prompt_ids) + answer_ids, dtype=torch.long)  # (Tr,)
    in_prompt = any(question.answer.lower() in m["content"].lower() for m in prompt)
    teacher_ids = teacher_labels = None
    if teacher:
        evidence = []
        for s, m in question.evidence:
            evidence += [dict(x) for x in episode.sessions[s].messages[m : m + 2]]
        shown = read_prompt(question.question, system_prompt, [*evidence, *(dict(m) for m in recent)], note_lines)
        shown_ids = render_prompt_ids(tokenizer, shown).tolist()
        teacher_ids = torch.tensor(shown_ids + answer_ids, dtype=torch.long)  # (Tt,)
        teacher_labels = torch.tensor([IGNORE] * len(shown_ids) + answer_ids, dtype=torch.long)  # (Tt,)
    return Example(tuple(pieces), read_ids, labels, episode.id, in_prompt, teacher_ids, teacher_labels)


def _count(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Batch examples: their write pieces scheduled into calls, their read tensors right-padded (and the
    teacher's, when every example has them)."""
    read_ids, read_mask, labels = _pad([e.read_ids for e in examples], [e.labels for e in examples], pad_id)
    calls = write_schedule.schedule_calls([list(e.write_pieces) for e in examples], pad_id)
    in_prompt = torch.tensor([e.answer_in_prompt for e in examples], dtype=torch.bool)  # (B,)
    teacher = None
    if all(e.teacher_ids is not None for e in examples):
        ids, mask, teacher_labels = _pad(
            [e.teacher_ids for e in examples], [e.teacher_labels for e in examples], pad_id
        )
        teacher = Batch((), ids, mask, teacher_labels)
    return Batch(tuple(calls), read_ids, read_mask, labels, in_prompt, teacher)


def _pad(ids: list[torch.Tensor], labels: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad ``(T_i,)`` ids and labels into ``(B, T)`` ids, mask and labels."""
    width, b = max(x.shape[0] for x in ids), len(ids)
    out_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    out_labels = torch.full((b, width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        out_ids[i, : x.shape[0]], mask[i, : x.shape[0]], out_labels[i, : x.shape[0]] = x, True, y
    return out_ids, mask, out_labels


def length_sorted_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Group examples of similar length (less padding), then shuffle the order of the groups with ``rng``."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].write_pieces), examples[i].cost, i))
    groups = [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups
