"""Content keys of memory states: a hash chain over exactly what the write schedule writes.

The state after writing messages m1..mn is a function of the model (its fingerprint), the piece size of the
schedule and the token ids written for each message (``write_schedule``). So its key is

    key_0 = sha256("deltamem-state-v1", fingerprint, piece size)
    key_i = sha256(key_{i-1}, sha256(token ids written for m_i))

and two conversations share a key exactly when they wrote the same tokens with the same model. A key reveals
nothing of the messages (it is a hash), and a state's key changes when any earlier message does.
"""

import hashlib
import threading
from collections import OrderedDict

import torch

from deltamem_agents.serving.write_schedule import render_for_writing

VERSION = "deltamem-state-v1"


def root_key(fingerprint: str, piece_tokens: int) -> str:
    """The key of the empty memory of one model and piece size."""
    return hashlib.sha256(f"{VERSION}\0{fingerprint}\0{piece_tokens}".encode()).hexdigest()


def chain(root: str, digests: list[str]) -> list[str]:
    """``keys[i]``: the key after the messages with these token digests up to ``i`` (``len(digests)`` keys)."""
    keys, key = [], root
    for digest in digests:
        key = hashlib.sha256(f"{key}\0{digest}".encode()).hexdigest()
        keys.append(key)
    return keys


def token_digest(ids: torch.Tensor) -> str:
    """sha256 of ``(T,)`` token ids as little-endian int64."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


class MessageDigests:
    """The token digest of each chat message as the schedule writes it, cached (LRU) per tokenizer: a long
    thread's history is rendered once per process, not once per turn."""

    def __init__(self, tokenizer, max_entries: int = 65536):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, message: dict) -> str:
        key = (message["role"], message["content"])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        digest = token_digest(render_for_writing(self.tokenizer, message))
        with self._lock:
            self._cache[key] = digest
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return digest
