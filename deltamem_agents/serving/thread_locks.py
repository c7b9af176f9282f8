"""Per-thread locks for the standalone stores: two concurrent turns of the same conversation thread must not
both write its memory, while different threads run freely.

The registry only holds locks that are held or waited for, so a server that sees millions of thread ids keeps
no lock per id after its turn ends.
"""

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class ThreadLocks:
    """A lock per key, created on first use and dropped when its last holder or waiter leaves."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[Hashable, list] = {}  # key -> [lock, holders + waiters]

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """Hold the lock of ``key`` for the duration of the block."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        """Keys with a holder or a waiter right now."""
        with self._guard:
            return len(self._locks)
