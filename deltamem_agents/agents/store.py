"""Standalone memory stores (use without LangGraph): thread id -> memory state bytes + written-message ids.

Inside a LangGraph graph the checkpointed ``memory`` channel is the memory; these stores are only for calling
``DeltaMemChat`` directly with ``config={"configurable": {"thread_id": ...}}``.
"""

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from deltamem_agents.core.errors import DeltaMemError


class StoreError(DeltaMemError, RuntimeError):
    """The store could not be read or written (e.g. read-only or full disk); the previous state is kept."""


@dataclass(frozen=True)
class ThreadMemory:
    """What a thread needs between turns: its memory bytes, the ids of messages written, and the turn count."""

    state: bytes | None
    written: tuple[str, ...] = ()
    step: int = 0


class InMemoryStore:
    """A dict of threads, safe for concurrent use; gone when the process ends."""

    def __init__(self):
        self._threads: dict[str, ThreadMemory] = {}
        self._lock = threading.Lock()

    def load(self, thread_id: str) -> ThreadMemory | None:
        with self._lock:
            return self._threads.get(thread_id)

    def save(self, thread_id: str, memory: ThreadMemory, fingerprint: str) -> None:
        with self._lock:
            self._threads[thread_id] = memory

    def delete(self, thread_id: str) -> None:
        with self._lock:
            self._threads.pop(thread_id, None)

    def threads(self) -> list[str]:
        with self._lock:
            return sorted(self._threads)


class SqliteMemoryStore:
    """Threads in one SQLite file (WAL), inspectable with any SQLite tool.

    Table ``threads``: thread_id (primary key), step, state (blob), state_bytes, written (JSON list),
    written_count, fingerprint, updated_at (unix seconds). Every save is one transaction: a failed save leaves
    the previous row intact.
    """

    TABLE = "threads"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            uri = self.path.startswith("file:")  # e.g. "file:threads.db?mode=ro" for a read-only view
            connection = sqlite3.connect(self.path, check_same_thread=False, timeout=30, uri=uri)
            self.db = sqlite_utils.Database(connection)
            if self.TABLE not in self.db.table_names():
                self.db[self.TABLE].create(
                    {
                        "thread_id": str,
                        "step": int,
                        "state": bytes,
                        "state_bytes": int,
                        "written": str,
                        "written_count": int,
                        "fingerprint": str,
                        "updated_at": float,
                    },
                    pk="thread_id",
                    if_not_exists=True,
                )
            self.db.enable_wal()
            self.db.execute("pragma secure_delete = on")  # deleted threads leave zeros, not their bytes
        except sqlite3.Error as err:
            raise StoreError(f"cannot open memory store {self.path}: {err}") from None

    def load(self, thread_id: str) -> ThreadMemory | None:
        with self._lock:
            try:
                rows = list(self.db.query(f"select * from {self.TABLE} where thread_id = ?", [thread_id]))
            except sqlite3.Error as err:
                raise StoreError(f"cannot read thread {thread_id!r} from {self.path}: {err}") from None
        if not rows:
            return None
        row = rows[0]
        return ThreadMemory(state=row["state"], written=tuple(json.loads(row["written"])), step=row["step"])

    def save(self, thread_id: str, memory: ThreadMemory, fingerprint: str) -> None:
        record = {
            "thread_id": thread_id,
            "step": memory.step,
            "state": memory.state,
            "state_bytes": len(memory.state or b""),
            "written": json.dumps(list(memory.written)),
            "written_count": len(memory.written),
            "fingerprint": fingerprint,
            "updated_at": time.time(),
        }
        with self._lock:
            try:
                with self.db.atomic():  # BEGIN ... COMMIT: a save lands whole or not at all
                    self.db[self.TABLE].upsert(record, pk="thread_id")
            except sqlite3.Error as err:
                raise StoreError(
                    f"cannot save thread {thread_id!r} to {self.path}: {err}; the previous state is unchanged"
                ) from None

    def delete(self, thread_id: str) -> None:
        """Remove the thread's row. ``secure_delete`` overwrites the freed pages with zeros and the WAL is
        checkpointed and truncated, so its bytes are gone from the files, not only from queries."""
        with self._lock:
            try:
                with self.db.atomic():
                    self.db.execute(f"delete from {self.TABLE} where thread_id = ?", [thread_id])
                self.db.execute("pragma wal_checkpoint(truncate)")
            except sqlite3.Error as err:
                raise StoreError(f"cannot delete thread {thread_id!r} from {self.path}: {err}") from None

    def threads(self) -> list[str]:
        with self._lock:
            return [r["thread_id"] for r in self.db.query(f"select thread_id from {self.TABLE} order by thread_id")]

    def close(self) -> None:
        self.db.conn.close()
