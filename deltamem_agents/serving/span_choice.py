"""Span choice by likelihood: a span-copy argument's value is the span of the source that the backbone finds most
likely as a whole, not the one greedy decoding walks into.

Greedy span copying (``serving.span_copy``) lets the first token decide: for "Hi, my laptop will not turn on since
this morning's update. Please open a ticket for it." the 135M model's most likely first title token is "update",
and the span closes there. Here, when the decoder reaches the value of a span argument (``"title": "``), every
word-aligned span of the source up to ``max_words`` words is scored in one short forward per start word, after
the prompt and the envelope so far (the memory read, not written):

    score(span) = (log p(span tokens) + log p(the value closes after it)) / (tokens + 1) ** length_power

where "closes" is any token that starts with the closing quote. ``length_power`` 0 is the plain sum (short spans
win, like greedy), 1 the mean per token (long spans win); in between is the usual length normalisation of beam
search. The chosen span's tokens are then forced, and the value closes; the grammar still checks every token.

:func:`span_scores` is the fast path (the prompt once, a cropped KV cache per start word);
:func:`span_scores_naive` scores every span with its own full forward, and the tests compare them.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.serving.span_copy import (
    _keep_only,
    _value_may_end,
    _word_start,
    closing_quote_ids,
    opening_quote_ids,
)

DEFAULT_MAX_WORDS = 12


@dataclass(frozen=True)
class ScoredSpan:
    """One candidate value: ``source[start:end]``, its token ids, and its log-probabilities."""

    start: int
    end: int
    token_ids: tuple[int, ...]
    logprob: float  # sum over the span's tokens
    close_logprob: float  # log p(a closing-quote token) right after it

    def score(self, length_power: float) -> float:
        return (self.logprob + self.close_logprob) / (len(self.token_ids) + 1) ** length_power


def span_bounds(source: str, max_words: int = DEFAULT_MAX_WORDS) -> dict[int, list[int]]:
    """``{start: [end, ...]}``: every span that starts at a word, runs at most ``max_words`` words and may end
    where ``serving.span_copy`` lets a value end (after a word, or after a sentence's final punctuation). Spans
    that would need a JSON escape (quote, backslash, control character) are left out."""
    out: dict[int, list[int]] = {}
    for start in (i for i in range(len(source)) if _word_start(source, i)):
        ends, words = [], 0
        for end in range(start + 1, len(source) + 1):
            char = source[end - 1]
            if char in '"\\' or ord(char) < 32:
                break
            if _word_start(source, end - 1):
                words += 1
                if words > max_words:
                    break
            if _value_may_end(source[start:end], source, end):
                ends.append(end)
        if ends:
            out[start] = ends
    return out


def _boundaries(tokenizer, text: str) -> tuple[list[int], dict[int, int]]:
    """The token ids of ``text`` and ``{character length: token count}`` at each token boundary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = {len(tokenizer.decode(ids[:k])): k for k in range(1, len(ids) + 1)}
    return ids, lengths


def span_scores(engine, state, prefix_ids: torch.Tensor, source: str, max_words: int = DEFAULT_MAX_WORDS):
    """Every span of :func:`span_bounds` scored after ``prefix_ids`` (``(T,)``: the prompt and the envelope up to
    the value's opening quote): the prefix runs once, then one forward per start word over the longest span from
    it, and the KV cache is cropped back. A span whose end falls inside a token is skipped."""
    closers = torch.tensor(closing_quote_ids(engine.tokenizer))
    out = []
    with engine.lock, torch.no_grad():
        cache = DeltaMemCache(engine.model, state or engine.empty_state(), writes=False)
        first = engine.model(prefix_ids[None].to(engine.device), cache=cache).logits[0, -1].float().log_softmax(-1)
        length = cache.get_seq_length()
        for start, ends in span_bounds(source, max_words).items():
            ids, at = _boundaries(engine.tokenizer, source[start : ends[-1]])
            step = torch.tensor([ids], device=engine.device)  # (1, n)
            rows = engine.model(step, cache=cache).logits[0].float().log_softmax(-1)  # (n, V): after ids[: k + 1]
            cache.crop(-(cache.get_seq_length() - length))
            rows = torch.cat([first[None], rows])  # (n + 1, V): row k predicts the token after ids[:k]
            token_lp = rows[:-1].gather(1, torch.tensor(ids, device=rows.device)[:, None]).flatten()  # (n,)
            close_lp = rows[:, closers.to(rows.device)].logsumexp(-1)  # (n + 1,)
            for end in ends:
                k = at.get(end - start)
                if k is not None:
                    out.append(ScoredSpan(start, end, tuple(ids[:k]), float(token_lp[:k].sum()), float(close_lp[k])))
    return out


def span_scores_naive(engine, state, prefix_ids: torch.Tensor, source: str, max_words: int = DEFAULT_MAX_WORDS):
    """The reference for :func:`span_scores`: each span tokenized alone and scored with its own full forward."""
    closers = torch.tensor(closing_quote_ids(engine.tokenizer))
    out = []
    for start, ends in span_bounds(source, max_words).items():
        for end in ends:
            ids = engine.tokenizer(source[start:end], add_special_tokens=False)["input_ids"]
            sequence = torch.cat([prefix_ids, torch.tensor(ids)])  # (T + n,)
            with engine.lock, torch.no_grad():
                cache = DeltaMemCache(engine.model, state or engine.empty_state(), writes=False)
                rows = engine.model(sequence[None].to(engine.device), cache=cache).logits[0].float().log_softmax(-1)
            rows = rows[len(prefix_ids) - 1 :]  # (n + 1, V)
            token_lp = rows[:-1].gather(1, torch.tensor(ids, device=rows.device)[:, None]).flatten()
            close_lp = rows[-1, closers.to(rows.device)].logsumexp(-1)
            out.append(ScoredSpan(start, end, tuple(ids), float(token_lp.sum()), float(close_lp)))
    return out


def best_span(spans: list[ScoredSpan], length_power: float) -> ScoredSpan | None:
    """The highest-scoring span (the earliest and shortest among equals), or None if there is none."""
    return max(spans, key=lambda s: (s.score(length_power), -s.start, -s.end), default=None)


@dataclass(frozen=True)
class SpanChoice:
    """A logit control (like ``serving.span_copy.SpanCopy``, which it replaces): when the value of one of
    ``arguments`` opens (the decoded text ends with ``"<name>": "``), ``choose(produced)`` returns the token ids
    of the chosen span for the tokens decoded so far; they are forced one by one, then a closing quote.

    Attributes:
        arguments: names of the string arguments whose value is a chosen span.
        tokenizer: the backbone's tokenizer.
        choose: ``produced token ids -> span token ids`` (empty: leave the value to the other controls).
    """

    arguments: frozenset[str]
    tokenizer: object
    choose: Callable[[list[int]], tuple[int, ...]]

    def start(self) -> "_ChoiceState":
        return _ChoiceState(self)


class _ChoiceState:
    def __init__(self, settings: SpanChoice):
        self.settings = settings
        self.keys = tuple(f'"{name}":' for name in settings.arguments)
        self.heads = tuple(f'"{name}": "' for name in settings.arguments)
        self.closers = list(closing_quote_ids(settings.tokenizer))
        self.openers = list(opening_quote_ids(settings.tokenizer))  # a bare quote opens the value
        self.forced: list[int] = []
        self.closing = False
        self.text = ""

    def adjust(self, logits: torch.Tensor) -> None:
        if self.forced:
            _keep_only(logits, self.forced[:1])
        elif self.closing:
            _keep_only(logits, self.closers)
        elif self.text.rstrip(" ").endswith(self.keys):
            _keep_only(logits, self.openers)

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        self.text = text
        if self.forced:
            if token == self.forced[0]:
                self.forced.pop(0)
            else:  # the grammar refused the forced token: give the value back to the model
                self.forced, self.closing = [], False
        elif self.closing:
            self.closing = False
        elif text.endswith(self.heads):
            self.forced = list(self.settings.choose(list(produced)))
            self.closing = bool(self.forced)
        return False
