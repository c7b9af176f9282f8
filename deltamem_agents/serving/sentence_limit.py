"""A reply that stops after a number of sentences.

A 135M model states a tool result in its first sentence or two ("Your ticket 1 is waiting for parts (updated
Tuesday).") and then runs on into invented detail ("I will bring the battery by Thursday. I promise."). With a
sentence limit the reply ends once it has written ``max_sentences`` sentences. A sentence ends at "!", "?", or a "."
that does not follow a digit (so decoding stops right after it, never inside "9.90"), with any closing quotes or
brackets, where the text ends or a space follows; and at a line break. A sentence that ends in a number ("Total
7.50.") is not counted, so the limit may let one more sentence through.

The same model also joins clause after clause with commas ("I will update you tomorrow, I will not turn the
power button on, I will delete this ticket, ..."), so one "sentence" can fill the whole token budget. With
``sentence_words`` a sentence that already has that many words ends at its next clause break: where the model
would write a comma or semicolon, it writes a full stop instead (the comma's score goes to the full stop), and
the sentence counts as finished. The model still picks where the clause ends.

A logit control like those in ``serving.repetition``: ``start()`` returns the per-generation state, with
``adjust(logits)`` and ``observe(token, produced, text)`` (True: stop now).
"""

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from deltamem_agents.serving.span_copy import token_texts

# (inside a JSON string a line break is the two characters "\n", and a quote is escaped)
_SENTENCE_END = re.compile(r"(?:(?<![\d.])\.|[!?])[.!?]*(?:\\?[\"')\]])*(?=\s|\\n|$)|\n|\\n")


@dataclass(frozen=True)
class SentenceLimit:
    """Stop the reply text once it holds ``max_sentences`` finished sentences.

    Attributes:
        max_sentences: how many sentences the reply may have (None: any number).
        after: the limit counts from where the decoded text first contains this string (the head of a reply
            envelope; "" = from the first token).
        sentence_words: a sentence with this many words ends at its next comma or semicolon (None: never).
        tokenizer: the backbone's tokenizer; needed with ``sentence_words``.
    """

    max_sentences: int | None
    after: str = ""
    sentence_words: int | None = None
    tokenizer: object = None

    def __post_init__(self):
        if self.sentence_words is not None and self.tokenizer is None:
            raise ValueError("SentenceLimit(sentence_words=...) needs the tokenizer (to find the comma tokens)")

    def start(self) -> "_SentenceState":
        return _SentenceState(self)


def open_sentence_words(text: str) -> int:
    """Words of the sentence that ``text`` ends in, after its last finished sentence (0 if that one just ended)."""
    return _sentences_and_open_words(text)[1]


@lru_cache(maxsize=4)
def clause_break_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """(ids of the tokens that are a comma or semicolon, with or without a leading space; the id of ".")."""
    texts = token_texts(tokenizer)
    breaks = tuple(i for i, t in enumerate(texts) if t.strip() in (",", ";"))
    stops = [i for i, t in enumerate(texts) if t == "."]
    if not stops:
        raise ValueError("the tokenizer has no '.' token: sentence_words cannot end a sentence")
    return breaks, stops[0]


def count_sentences(text: str) -> int:
    """Finished sentences in ``text`` (see the module docstring)."""
    return len(_SENTENCE_END.findall(text))


def _sentences_and_open_words(text: str) -> tuple[int, int]:
    """(finished sentences in ``text``, words of the sentence it ends in), from one scan."""
    ends = list(_SENTENCE_END.finditer(text))
    return len(ends), len(text[ends[-1].end() if ends else 0 :].split())


class _SentenceState:
    def __init__(self, settings: SentenceLimit):
        self.settings = settings
        self.open_words: int | None = None  # words of the reply's open sentence (None outside the reply text)
        if settings.sentence_words is not None:
            breaks, self.stop = clause_break_ids(settings.tokenizer)
            self.breaks = torch.tensor(breaks)  # (K,)

    def adjust(self, logits: torch.Tensor) -> None:
        words = self.settings.sentence_words
        if words is None or self.open_words is None or self.open_words < words:
            return
        breaks = self.breaks.to(logits.device)  # (K,)
        best_break = logits[breaks].max()
        if torch.isfinite(best_break) and best_break > logits[self.stop]:
            logits[self.stop] = best_break  # a clause break becomes the sentence's end
        logits[breaks] = float("-inf")

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        after = self.settings.after
        self.open_words = None
        if after and after not in text:
            return False
        reply = text.split(after, 1)[1] if after else text
        if after and _UNESCAPED_QUOTE.search(reply):
            return False  # the enveloped reply has closed: the grammar finishes the envelope
        sentences, self.open_words = _sentences_and_open_words(reply)
        limit = self.settings.max_sentences
        return limit is not None and sentences >= limit


@dataclass(frozen=True)
class CloseAtSentenceEnd:
    """Inside a reply envelope (after ``after``, the envelope's reply head), the reply text may only close (a
    token with an unescaped quote, such as ``"`` or `` "``) where a sentence has ended, never before it has begun.

    A small model copying a tool result like ``Event 3 "budget review" moved to Monday`` writes the quote
    unescaped, and under the JSON grammar that quote ends the reply: "Event 3 ". With this rule the quote is
    refused mid-sentence, so the model writes the title some other way (or escapes the quote) and goes on.

    Attributes:
        tokenizer: the backbone's tokenizer (for the text of every token).
        after: the head of the reply envelope.
    """

    tokenizer: object
    after: str

    def start(self) -> "_CloseState":
        return _CloseState(self)


_UNESCAPED_QUOTE = re.compile(r'(?<!\\)(?:\\\\)*"')  # a quote that ends a JSON string


@lru_cache(maxsize=4)
def unescaped_quote_ids(tokenizer) -> tuple[int, ...]:
    """The ids of tokens with an unescaped quote anywhere in them (cached per tokenizer)."""
    return tuple(i for i, t in enumerate(token_texts(tokenizer)) if _UNESCAPED_QUOTE.search(t))


_ENDED = re.compile(r"[.!?](?:\\?[\"')\]])*\s*$")


class _CloseState:
    def __init__(self, settings: CloseAtSentenceEnd):
        self.settings = settings
        self.closers = torch.tensor(unescaped_quote_ids(settings.tokenizer))
        self.reply: str | None = None  # the reply text so far, once the head is decoded

    def adjust(self, logits: torch.Tensor) -> None:
        if self.reply is None or _ENDED.search(self.reply):
            return
        closers = self.closers.to(logits.device)
        keep = logits[closers].clone()
        logits[closers] = float("-inf")
        if not torch.isfinite(logits).any():  # the grammar allows nothing else: let the reply close
            logits[closers] = keep

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        if self.settings.after in text:
            self.reply = text.split(self.settings.after, 1)[1]
        return False
