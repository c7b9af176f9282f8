"""Logit controls for chat decoding: repetition control (small models loop: "Update ticket for dana's ticket."
nine times) and a copy bias for tool arguments (values the user stated are copied, not invented).

A control is a frozen settings object whose ``start()`` returns the per-generation state, with
``adjust(logits)`` (called on each step's logits after any grammar mask) and ``observe(token, produced, text)``
(True: stop now). ``GenerationSettings.controls`` holds them; the engine calls nothing else.

Repetition control:

Three mechanisms, applied only to the reply text (after ``RepetitionSettings.after`` has been decoded, e.g. the
head of a reply envelope, so JSON structure and tool arguments are never touched):
  - no-repeat n-grams: a token that would make a token n-gram occur more than ``max_ngram_repeats`` times in the
    reply is masked (never the last token the grammar allows);
  - a repetition penalty (CTRL-style: positive logits divided, negative multiplied) on tokens already in the
    reply;
  - a cycle stop: when a finished sentence repeats an earlier sentence of the reply (same words, case and
    punctuation aside), decoding stops.
Only the reply's own tokens count: copying a value from the prompt or a tool result is never penalised.
"""

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

_SENTENCE_END = re.compile(r"[.!?\n]")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class RepetitionSettings:
    """How a reply is kept from looping.

    Attributes:
        ngram_size: length of the token n-grams that are counted.
        max_ngram_repeats: an n-gram may occur at most this often in one reply (1 = HF's ``no_repeat_ngram_size``).
        penalty: repetition penalty on tokens already in the reply; 1.0 turns it off.
        stop_on_cycle: stop when a sentence repeats an earlier sentence of the reply.
        after: control starts once the decoded text contains this string ("" = from the first token).
    """

    ngram_size: int = 4
    max_ngram_repeats: int = 1
    penalty: float = 1.1
    stop_on_cycle: bool = True
    after: str = ""

    def start(self) -> "RepetitionGuard":
        return RepetitionGuard(self)


class RepetitionGuard:
    """The per-generation state of :class:`RepetitionSettings`: call :meth:`adjust` on each step's logits (after
    any grammar mask) and :meth:`observe` with each accepted token; :meth:`observe` returns True to stop."""

    def __init__(self, settings: RepetitionSettings):
        self.settings = settings
        self.start: int | None = 0 if not settings.after else None  # index in ``produced`` where the reply begins
        self.tokens: list[int] = []
        self.next_counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)  # n-1 prefix -> next tokens

    def adjust(self, logits: torch.Tensor) -> None:
        """Penalise and mask ``logits`` (V,) in place for the next reply token."""
        if self.start is None or not self.tokens:
            return
        s = self.settings
        if s.penalty != 1.0:
            seen = torch.tensor(sorted(set(self.tokens)), device=logits.device)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / s.penalty, values * s.penalty)
        n = s.ngram_size
        if len(self.tokens) >= n - 1:
            counts = self.next_counts.get(tuple(self.tokens[len(self.tokens) - (n - 1) :]))
            banned = [t for t, c in (counts or {}).items() if c >= s.max_ngram_repeats]
            if banned:
                keep = logits[banned].clone()
                logits[banned] = float("-inf")
                if not torch.isfinite(logits).any():  # the grammar allows nothing else: let it through
                    logits[banned] = keep

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        """Record ``token`` (already appended to ``produced``; ``text`` is their decoding). True: stop now."""
        s = self.settings
        if self.start is None:
            if s.after in text:
                self.start = len(produced)
            return False
        self.tokens.append(token)
        n = s.ngram_size
        if len(self.tokens) >= n:
            self.next_counts[tuple(self.tokens[-n:-1])][self.tokens[-1]] += 1
        return s.stop_on_cycle and _repeats_a_sentence(text.split(s.after, 1)[-1] if s.after else text)


def _repeats_a_sentence(text: str) -> bool:
    """Whether the sentence that ``text`` just finished has the same words as an earlier one."""
    if not text or not _SENTENCE_END.match(text[-1]):
        return False
    sentences = [tuple(_WORD.findall(part.lower())) for part in _SENTENCE_END.split(text)]
    sentences = [words for words in sentences if words]
    return len(sentences) >= 2 and sentences[-1] in sentences[:-1]


@dataclass(frozen=True)
class CopyBias:
    """Adds ``bonus`` to the logits of ``tokens`` (the ids of the user's newest message) once the decoded text
    contains ``after`` (the start of a tool call's arguments; "" = from the first token): a small model then
    copies the numbers and names the user stated instead of inventing them. The grammar still decides what is
    valid and the model still chooses; ``bonus`` 0 turns it off."""

    tokens: frozenset[int]
    bonus: float = 2.0
    after: str = '"arguments": '

    def start(self) -> "_CopyState":
        return _CopyState(self)


class _CopyState:
    def __init__(self, settings: CopyBias):
        self.settings = settings
        self.active = not settings.after  # no ``after``: from the first token
        self.ids = torch.tensor(sorted(settings.tokens), dtype=torch.long)

    def adjust(self, logits: torch.Tensor) -> None:
        if self.active and self.ids.numel() and self.settings.bonus:
            logits[self.ids.to(logits.device)] += self.settings.bonus  # -inf (masked by the grammar) stays -inf

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        self.active = self.active or self.settings.after in text
        return False
