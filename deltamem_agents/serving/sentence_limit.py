"""A reply that stops after a number of sentences.

A 135M model states a tool result in its first sentence or two ("Your ticket 1 is waiting for parts (updated
Tuesday).") and then runs on into invented detail ("I will bring the battery by Thursday. I promise."). With a
sentence limit the reply ends once it has written ``max_sentences`` sentences. A sentence ends at "!", "?", or a "."
that does not follow a digit (so decoding stops right after it, never inside "9.90"), with any closing quotes or
brackets, where the text ends or a space follows; and at a line break. A sentence that ends in a number ("Total
7.50.") is not counted, so the limit may let one more sentence through.

A logit control like those in ``serving.repetition``: ``start()`` returns the per-generation state, with
``adjust(logits)`` and ``observe(token, produced, text)`` (True: stop now).
"""

import re
from dataclasses import dataclass

import torch

from deltamem_agents.serving.span_copy import token_texts

# (inside a JSON string a line break is the two characters "\n", and a quote is escaped)
_SENTENCE_END = re.compile(r"(?:(?<![\d.])\.|[!?])[.!?]*(?:\\?[\"')\]])*(?=\s|\\n|$)|\n|\\n")


@dataclass(frozen=True)
class SentenceLimit:
    """Stop the reply text once it holds ``max_sentences`` finished sentences.

    Attributes:
        max_sentences: how many sentences the reply may have.
        after: the limit counts from where the decoded text first contains this string (the head of a reply
            envelope; "" = from the first token).
    """

    max_sentences: int
    after: str = ""

    def start(self) -> "_SentenceState":
        return _SentenceState(self)


def count_sentences(text: str) -> int:
    """Finished sentences in ``text`` (see the module docstring)."""
    return len(_SENTENCE_END.findall(text))


class _SentenceState:
    def __init__(self, settings: SentenceLimit):
        self.settings = settings

    def adjust(self, logits: torch.Tensor) -> None:
        return None

    def observe(self, token: int, produced: list[int], text: str) -> bool:
        after = self.settings.after
        if after and after not in text:
            return False
        reply = text.split(after, 1)[1] if after else text
        if after and _UNESCAPED_QUOTE.search(reply):
            return False  # the enveloped reply has closed: the grammar finishes the envelope
        return count_sentences(reply) >= self.settings.max_sentences


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
_ENDED = re.compile(r"[.!?](?:\\?[\"')\]])*\s*$")


class _CloseState:
    def __init__(self, settings: CloseAtSentenceEnd):
        self.settings = settings
        texts = token_texts(settings.tokenizer)
        self.closers = torch.tensor([i for i, t in enumerate(texts) if _UNESCAPED_QUOTE.search(t)])
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
