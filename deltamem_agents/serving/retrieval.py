"""BM25 recall of older messages of the SAME thread, placed in the prompt as notes under a token cap."""

import re
from collections.abc import Callable
from dataclasses import dataclass

from rank_bm25 import BM25Plus

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an the and or but if of to in on at for with by from is are was were be been am i you he she it we they "
    "me my your our their his her its this that these those do does did so as what which who whom when where "
    "how can could would should will shall may might have has had not no yes please thanks thank".split()
)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words without stop words: the BM25 vocabulary."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


@dataclass(frozen=True)
class Note:
    """One retrieved message: its position in the thread, role, text and BM25 score."""

    position: int
    role: str
    text: str
    score: float


def retrieve_notes(
    history: list[tuple[str, str]],
    query: str,
    count_tokens: Callable[[str], int],
    max_tokens: int = 256,
    max_notes: int = 4,
) -> list[Note]:
    """The best-matching earlier messages for ``query``, in conversation order, within ``max_tokens``.

    Args:
        history: ``(role, text)`` of the thread's older messages (only this thread's: never mix threads).
        query: what to match, usually the newest user message.
        count_tokens: the backbone tokenizer's length function (the cap is in real tokens).
        max_tokens: total token budget of the returned notes; a note longer than what is left is cut.
        max_notes: at most this many notes.
    """
    query_words = words(query)
    corpus = [words(text) for _, text in history]
    if not query_words or not any(corpus):
        return []
    scores = BM25Plus([doc or ["\0"] for doc in corpus]).get_scores(query_words)
    ranked = sorted(
        (i for i in range(len(history)) if scores[i] > 0 and set(query_words) & set(corpus[i])),
        key=lambda i: (-scores[i], -i),
    )
    chosen, budget = [], max_tokens
    for i in ranked[:max_notes]:
        role, text = history[i]
        cost = count_tokens(text)
        if cost > budget:
            text = _cut_to_tokens(text, budget, count_tokens)
            cost = count_tokens(text)
            if not text:
                break
        chosen.append(Note(position=i, role=role, text=text, score=float(scores[i])))
        budget -= cost
        if budget <= 0:
            break
    return sorted(chosen, key=lambda note: note.position)


def _cut_to_tokens(text: str, budget: int, count_tokens: Callable[[str], int]) -> str:
    """The longest word-boundary prefix of ``text`` within ``budget`` tokens (binary search on words)."""
    parts = text.split()
    lo, hi = 0, len(parts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(parts[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(parts[:lo])
