"""Answer scoring: LoCoMo token F1 as the reference evaluation does it (METHOD.md), exact match and
contains-answer."""

import re
import string
import unicodedata
from collections import Counter
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_PUNCT = set(string.punctuation)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def first_line(prediction: str) -> str:
    """The first non-empty line of a prediction (only that is scored)."""
    for line in str(prediction).splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize_answer(text) -> str:
    """NFD, drop commas, lower-case, remove punctuation and the words a / an / the / and, collapse spaces."""
    text = unicodedata.normalize("NFD", str(text)).replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction, answer) -> float:
    """Token-level F1 of Porter-stemmed normalised tokens."""
    stem = _stemmer().stem
    pred = [stem(w) for w in normalize_answer(prediction).split()]
    gold = [stem(w) for w in normalize_answer(answer).split()]
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction, answer, category: int | None) -> float:
    """LoCoMo's per-question F1: category 1 splits on commas (mean over answer parts of the best prediction part),
    category 3 uses the answer before the first ';'. Only the prediction's first non-empty line counts."""
    prediction, answer = first_line(prediction), str(answer)
    if category == 3:
        answer = answer.split(";")[0].strip()
    if category == 1:
        preds = [p for p in prediction.split(",") if p.strip()] or [""]
        golds = [g for g in answer.split(",") if g.strip()] or [""]
        return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)
    return token_f1(prediction, answer)


def exact_match(prediction, answer) -> float:
    """1.0 when the normalised first line equals the normalised answer."""
    return float(normalize_answer(first_line(prediction)) == normalize_answer(answer))


def contains_answer(prediction, answer) -> float:
    """1.0 when the normalised answer occurs (as whole words) in the normalised prediction."""
    gold = normalize_answer(answer)
    if not gold:
        return 0.0
    return float(f" {gold} " in f" {normalize_answer(prediction)} ")


def score(prediction, answer, category: int | None = None) -> dict[str, float]:
    """All metrics of one prediction."""
    return {
        "f1": locomo_f1(prediction, answer, category),
        "em": exact_match(prediction, answer),
        "contains": contains_answer(prediction, answer),
    }
