"""Span-copy arguments: a string argument whose value must be a span of a source text (the user's message).

A 135M model asked for a ticket's title writes "Update" for "my laptop will not turn on since this morning's
update"; a soft copy bias pushes it to repeat one word of the request. When a tool declares that an argument
copies the request (``DeltaMemChat.span_arguments``), decoding that string admits only tokens that continue a span
of the source, starting at a word and ending at a word boundary (case-insensitive, so "Laptop" may start a span
at "laptop"). The model still chooses where the span starts, how it continues and where it stops; the grammar
still decides what is valid JSON. Run it before softer controls (the repetition rules never mask the last token
that is allowed, so a span is never broken by them).

A logit control like those in ``serving.repetition``: ``start()`` returns the per-generation state, with
``adjust(logits)`` after the grammar mask and ``observe(token, produced, text)``.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class SpanCopy:
    """While the string value of one of ``arguments`` is decoded (its text follows ``"<name>": "``), only tokens
    that keep the value a span of ``source`` are allowed, plus the closing quote at a word boundary.

    Attributes:
        source: the text the value is copied from.
        arguments: names of the string arguments that copy a span (in the envelope being decoded).
        tokenizer: the backbone's tokenizer (for the text of every token).
    """

    source: str
    arguments: frozenset[str]
    tokenizer: object

    def start(self) -> "_SpanState":
        return _SpanState(self)


class _SpanState:
    def __init__(self, settings: SpanCopy):
        self.settings = settings
        self.source = settings.source.lower()
        self.heads = tuple(f'"{name}": "' for name in settings.arguments)
        self.keys = tuple(f'"{name}":' for name in settings.arguments)
        texts = token_texts(settings.tokenizer)
        self.pieces = _pieces(texts, self.source)  # [(token id, lower-case text)] of tokens inside the source
        self.closers = list(closing_quote_ids(settings.tokenizer))
        self.openers = list(opening_quote_ids(settings.tokenizer))
        self.value_start: int | None = None  # index in the decoded text where the current value begins
        self.text = ""  # the decoded text so far

    def _ends(self, value: str) -> list[int]:
        """Positions in the source right after an occurrence of ``value`` that starts at a word."""
        value, n = value.lower(), len(value)
        if not value:
            return [i for i in range(len(self.source)) if _word_start(self.source, i)]
        return [i + n for i in _find_all(self.source, value) if _word_start(self.source, i)]

    def adjust(self, logits: torch.Tensor) -> None:
        if self.value_start is None:
            if self.text.rstrip(" ").endswith(self.keys):  # the next token opens one of our values
                _keep_only(logits, self.openers)
            return
        value = self.text[self.value_start :]
        ends = self._ends(value)
        allowed = [i for i, piece in self.pieces if any(self.source.startswith(piece, e) for e in ends)]
        if any(_value_may_end(value, self.source, e) for e in ends):
            allowed += self.closers  # a value ends at the end of a word (or of a sentence)
        if not allowed and ends:
            allowed = self.closers  # the span reached the end of the source: the value ends here
        if not allowed:
            return  # nothing continues a span (e.g. an escape was needed): leave it to the grammar
        _keep_only(logits, allowed)

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        self.text = text
        if self.value_start is not None:
            if '"' in text[self.value_start :]:
                self.value_start = None  # the value is closed
        elif any(text.endswith(head) for head in self.heads):
            self.value_start = len(text)
        return False


def _keep_only(logits: torch.Tensor, allowed: list[int]) -> None:
    """Mask every token but ``allowed`` in place, unless the grammar allows none of them."""
    if not allowed:
        return
    keep = torch.full_like(logits, float("-inf"))
    index = torch.tensor(allowed, device=logits.device)
    keep[index] = logits[index]
    if torch.isfinite(keep).any():
        logits.copy_(keep)


def _find_all(text: str, piece: str) -> list[int]:
    out, i = [], text.find(piece)
    while i >= 0:
        out.append(i)
        i = text.find(piece, i + 1)
    return out


def _word_start(text: str, i: int) -> bool:
    return i < len(text) and text[i].isalnum() and (i == 0 or not text[i - 1].isalnum())


def _word_end(text: str, i: int) -> bool:
    return i == len(text) or not (text[i].isalnum() and text[i - 1].isalnum())


def _value_may_end(value: str, source: str, end: int) -> bool:
    """Whether a span ``value`` that stops at ``end`` of ``source`` may close there: after a word's last
    character, or after a sentence's final punctuation ("... for it.") where the source ends or a space follows."""
    if value[-1:].isalnum():
        return _word_end(source, end)
    return value[-1:] in (".", "!", "?") and (end == len(source) or source[end].isspace())


def _pieces(texts: tuple[str, ...], source: str) -> list[tuple[int, str]]:
    """(id, lower-case text) of every token whose text occurs in ``source`` (case-insensitive)."""
    longest = 24
    spans = {source[i:j] for i in range(len(source)) for j in range(i + 1, min(len(source), i + longest) + 1)}
    index = _by_text(texts)
    return [(i, text) for text in spans for i in index.get(text, ())]


@lru_cache(maxsize=4)
def token_texts(tokenizer) -> tuple[str, ...]:
    """The decoded text of every token id (cached per tokenizer)."""
    return tuple(tokenizer.decode([i]) for i in range(len(tokenizer)))


@lru_cache(maxsize=4)
def closing_quote_ids(tokenizer) -> tuple[int, ...]:
    """The ids of tokens that start with a quote: each can end a JSON string value (cached per tokenizer)."""
    return tuple(i for i, t in enumerate(token_texts(tokenizer)) if t.startswith('"'))


@lru_cache(maxsize=4)
def opening_quote_ids(tokenizer) -> tuple[int, ...]:
    """The ids of the bare quote tokens (``"`` with optional spaces): the only ones that may open a value whose
    text must follow its head exactly; a merged one (``' ",'``) would write past it (cached per tokenizer)."""
    return tuple(i for i, t in enumerate(token_texts(tokenizer)) if t.strip() == '"')


@lru_cache(maxsize=4)
def _by_text(texts: tuple[str, ...]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        out.setdefault(text.lower(), []).append(i)
    return out
