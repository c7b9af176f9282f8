"""Episode -> token tensors for training: the write pass (system + history) and the read pass (system + question
+ answer, labels on the answer tokens only), padded batches sorted by length."""

import random
from dataclasses import dataclass

import torch

from deltamem_agents.serving.templating import render_chat
from deltamem_agents.train.episodes import Episode
from deltamem_agents.train.synthetic import SYSTEM_PROMPT

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training example: ``write_ids`` (Tw,), ``write_segments`` (Tw,) message ids (-1: not written),
    ``read_ids`` (Tr,), ``labels`` (Tr,) with IGNORE outside the answer."""

    write_ids: torch.Tensor
    write_segments: torch.Tensor
    read_ids: torch.Tensor
    labels: torch.Tensor
    episode_id: str = ""

    @property
    def cost(self) -> int:
        return int(self.write_ids.shape[0] + self.read_ids.shape[0])


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of B examples. Masks are true on real tokens."""

    write_ids: torch.Tensor  # (B, Tw)
    write_mask: torch.Tensor  # (B, Tw)
    write_segments: torch.Tensor  # (B, Tw)
    read_ids: torch.Tensor  # (B, Tr)
    read_mask: torch.Tensor  # (B, Tr)
    labels: torch.Tensor  # (B, Tr)

    @property
    def size(self) -> int:
        return self.write_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.write_mask.sum() + self.read_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def read_prompt(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """The read pass's messages before the answer: the system prompt and the question."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def encode_example(
    tokenizer, episode: Episode, question_index: int = 0, system_prompt: str = SYSTEM_PROMPT, max_write_tokens=2048
) -> Example:
    """Tokenize one (episode, question) pair; the history keeps its LAST ``max_write_tokens`` tokens."""
    question = episode.questions[question_index]
    written = render_chat(tokenizer, [{"role": "system", "content": system_prompt}, *episode.history()])
    segments = written.segment_ids()
    write_ids = written.input_ids[-max_write_tokens:]  # (Tw,)
    segments = segments[-max_write_tokens:]
    prompt = tokenizer.apply_chat_template(
        read_prompt(question.question, system_prompt), tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(question.answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    read_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)  # (Tr,)
    labels = torch.tensor([IGNORE] * len(prompt_ids) + answer_ids, dtype=torch.long)  # (Tr,)
    return Example(write_ids, segments, read_ids, labels, episode.id)


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad examples into a Batch."""
    tw = max(e.write_ids.shape[0] for e in examples)
    tr = max(e.read_ids.shape[0] for e in examples)
    b = len(examples)
    write_ids = torch.full((b, tw), pad_id, dtype=torch.long)
    write_mask = torch.zeros((b, tw), dtype=torch.bool)
    write_segments = torch.full((b, tw), -1, dtype=torch.long)
    read_ids = torch.full((b, tr), pad_id, dtype=torch.long)
    read_mask = torch.zeros((b, tr), dtype=torch.bool)
    labels = torch.full((b, tr), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n, m = e.write_ids.shape[0], e.read_ids.shape[0]
        write_ids[i, :n], write_mask[i, :n], write_segments[i, :n] = e.write_ids, True, e.write_segments
        read_ids[i, :m], read_mask[i, :m], labels[i, :m] = e.read_ids, True, e.labels
    return Batch(write_ids, write_mask, write_segments, read_ids, read_mask, labels)


def length_sorted_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Group examples of similar length (less padding), then shuffle the order of the groups with ``rng``."""
    order = sorted(range(len(examples)), key=lambda i: (examples[i].cost, i))
    groups = [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return groups
