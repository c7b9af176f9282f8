"""Distractor small talk between the facts: real chats from the MIT-licensed ``chitchat-dataset`` package when it
is installed, else a small built-in set. Chats are split between train / dev / test by a hash of the chat id,
so no filler chat is shared between splits."""

import hashlib
import random
from functools import lru_cache

SPLITS = ("train", "dev", "test")

_BUILTIN = (
    ("Long day at work today.", "Sorry to hear that. Anything I can do?"),
    ("The weather has been strange lately.", "It really has. Rain one hour, sun the next."),
    ("I watched a documentary about octopuses.", "They are fascinating animals. What did you learn?"),
    ("My neighbour is renovating again.", "That sounds noisy. Hopefully it ends soon."),
    ("I tried a new recipe for soup.", "Nice! Did it turn out well?"),
    ("Traffic was terrible this morning.", "Commutes like that are exhausting."),
    ("I started reading a mystery novel.", "Good choice. Mysteries are great for evenings."),
    ("We might go hiking on the weekend.", "Sounds fun, I hope the weather holds."),
    ("My phone battery dies so fast now.", "Maybe it is time for a battery check."),
    ("I can't decide what to have for dinner.", "Pasta is always a safe option."),
    ("The gym was packed today.", "Evenings are always busy there."),
    ("I finally cleaned my desk.", "That must feel great."),
)


def split_of(key: str, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> str:
    """A stable split for ``key``: the hash of (seed, key) picks train / dev / test with ``fractions``."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if value < fractions[0]:
        return "train"
    return "dev" if value < fractions[0] + fractions[1] else "test"


@lru_cache(maxsize=4)
def _chitchat_pairs(seed: int) -> dict[str, tuple[tuple[str, str], ...]] | None:
    try:
        import chitchat_dataset

        chats = chitchat_dataset.Dataset()
    except (ImportError, OSError, ValueError):  # not installed, or installed without its data file
        return None
    pairs: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for chat_id, chat in chats.items():
        turns = [" ".join(m["text"] for m in block) for block in chat["messages"]]
        turns = [_clip(t) for t in turns if t.strip()]
        bucket = pairs[split_of(chat_id, seed)]
        for i in range(0, len(turns) - 1, 2):
            bucket.append((turns[i], turns[i + 1]))
    return {s: tuple(p) for s, p in pairs.items()}


def _clip(text: str, max_words: int = 16) -> str:
    words = text.split()
    return " ".join(words[:max_words])


class FillerSource:
    """Yields (user, assistant) small-talk pairs of one split."""

    def __init__(self, split: str, seed: int = 0, use_chitchat: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pairs = _chitchat_pairs(seed) if use_chitchat else None
        self.pairs = pairs[split] if pairs else _BUILTIN
        self.source = "chitchat-dataset" if pairs else "builtin"

    def sample(self, rng: random.Random, count: int) -> list[tuple[str, str]]:
        """``count`` small-talk pairs drawn with ``rng``."""
        return [self.pairs[rng.randrange(len(self.pairs))] for _ in range(count)]
