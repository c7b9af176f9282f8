"""Content-addressed memory state stores: the key of a state names the exact messages written into it.

A memory state is a function of the messages written into it, in order, and of the model that wrote them
(``serving.write_schedule``). So a state is stored under a key that hashes exactly those things
(``MemoryEngine.state_keys``: a hash chain over each written message's token ids, rooted in the model
fingerprint), never under a thread id. Every turn, the chat model computes the chain for the messages the
turn must have written, takes the longest prefix found here, writes only the rest and stores the new state.
Whatever holds the messages (a LangGraph checkpoint, a fork, an old checkpoint replayed, a chat history, a new
process) therefore reads exactly the memory of the messages it holds; a missing or evicted state is recomputed,
never guessed. Nothing in the graph state refers to the memory.

Forgetting: each store also records which thread (``owner``: the run's ``thread_id`` or ``session_id``) used
which states; :meth:`forget` removes the thread's references and every state no other thread uses.

Stores: :class:`InMemoryStore` (per process, bounded), :class:`SqliteMemoryStore` (one file, shared by the
processes of one machine), :class:`PostgresMemoryStore` (shared by workers on many machines; it can live in the
checkpointer's database). All are safe for concurrent use; two workers that compute the same key store the same
bytes, so concurrent puts of one key are harmless.
"""

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from deltamem_agents.core.errors import DeltaMemError

LOOKUP_CHUNK = 500  # keys per lookup query (well under SQLite's and Postgres' parameter limits)


class StoreError(DeltaMemError, RuntimeError):
    """The store could not be read or written (e.g. read-only or full disk); what it held is unchanged."""


def longest_stored(keys: Sequence[str], found_among) -> tuple[int, str | None]:
    """``(n, key)``: the largest n such that ``keys[n - 1]`` is stored, and that key; ``(0, None)`` if none.

    ``found_among(chunk)`` returns the subset of ``chunk`` that is stored; the newest keys are asked first, so a
    thread that goes on from its previous turn needs one query."""
    for end in range(len(keys), 0, -LOOKUP_CHUNK):
        chunk = list(keys[max(end - LOOKUP_CHUNK, 0) : end])
        found = found_among(chunk)
        for n in range(end, end - len(chunk), -1):
            if keys[n - 1] in found:
                return n, keys[n - 1]
    return 0, None


class InMemoryStore:
    """States in a dict, gone when the process ends; the least recently used are evicted beyond ``max_states``
    (an evicted state is recomputed from its longest stored prefix when it is needed again)."""

    def __init__(self, max_states: int = 1024):
        if max_states < 1:
            raise StoreError(f"max_states must be at least 1, got {max_states}")
        self.max_states = max_states
        self._states: OrderedDict[str, bytes] = OrderedDict()
        self._refs: dict[str, set[str]] = {}  # owner -> keys it used
        self._lock = threading.Lock()

    def longest(self, keys: Sequence[str]) -> tuple[int, bytes | None]:
        """``(n, state)`` for the longest stored prefix ``keys[:n]`` (see :func:`longest_stored`)."""
        with self._lock:
            n, key = longest_stored(keys, lambda chunk: {k for k in chunk if k in self._states})
            if key is None:
                return 0, None
            self._states.move_to_end(key)
            return n, self._states[key]

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._states.get(key)

    def put(self, key: str, state: bytes | None, owner: str | None) -> None:
        """Store ``state`` under ``key`` (None: only record that ``owner`` uses the stored ``key``)."""
        with self._lock:
            if state is not None:
                self._states[key] = state
                self._states.move_to_end(key)
                while len(self._states) > self.max_states:
                    self._states.popitem(last=False)
            if owner is not None:
                self._refs.setdefault(owner, set()).add(key)

    def forget(self, owner: str) -> int:
        """Drop ``owner``'s references and every state no other owner uses; returns how many states went."""
        with self._lock:
            keys = self._refs.pop(owner, set())
            used = set().union(*self._refs.values()) if self._refs else set()
            gone = [k for k in keys if k not in used and k in self._states]
            for key in gone:
                del self._states[key]
            return len(gone)

    def owners(self) -> list[str]:
        with self._lock:
            return sorted(self._refs)

    def keys_of(self, owner: str) -> list[str]:
        with self._lock:
            return sorted(self._refs.get(owner, ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)


class _SqlStore:
    """What the SQL stores share: lookups, listing and the error wrapping; a subclass gives its connection
    (``conn``), driver error class (``ERROR``), where it is (``WHERE``), queries and how a list of keys is
    passed as one parameter (``_list``)."""

    ERROR: type = Exception
    FIND = GET = OWNERS = KEYS_OF = COUNT = ""

    def _list(self, keys: list[str]):
        raise NotImplementedError

    def _rollback(self) -> None:
        """Undo an open transaction after an error (where the driver does not)."""

    def _run(self, what: str, work):
        with self._lock:
            try:
                return work(self.conn)
            except self.ERROR as err:
                self._rollback()
                raise StoreError(f"cannot {what} in {self.WHERE}: {err}; what it held is unchanged") from None

    def longest(self, keys: Sequence[str]) -> tuple[int, bytes | None]:
        """``(n, state)`` for the longest stored prefix ``keys[:n]`` (see :func:`longest_stored`)."""

        def work(conn):
            found_among = lambda chunk: {row[0] for row in conn.execute(self.FIND, [self._list(chunk)])}  # noqa: E731
            n, key = longest_stored(keys, found_among)
            return (n, self._get(conn, key)) if key else (0, None)

        return self._run("read states", work)

    def _get(self, conn, key: str) -> bytes | None:
        row = conn.execute(self.GET, [key]).fetchone()
        return bytes(row[0]) if row else None

    def get(self, key: str) -> bytes | None:
        return self._run("read a state", lambda conn: self._get(conn, key))

    def owners(self) -> list[str]:
        return [row[0] for row in self._run("list threads", lambda c: c.execute(self.OWNERS).fetchall())]

    def keys_of(self, owner: str) -> list[str]:
        return [row[0] for row in self._run("list states", lambda c: c.execute(self.KEYS_OF, [owner]).fetchall())]

    def __len__(self) -> int:
        return self._run("count states", lambda c: c.execute(self.COUNT).fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class SqliteMemoryStore(_SqlStore):
    """States in one SQLite file (WAL), inspectable with any SQLite tool and shared by local processes.

    Tables: ``states`` (key primary key, state blob, state_bytes, created_at unix seconds) and ``state_refs``
    (owner, key; primary key both). Every change is one transaction. ``secure_delete`` is on and the WAL is
    checkpointed and truncated after a forget, so a forgotten state's bytes are gone from the files too.
    """

    ERROR = sqlite3.Error
    FIND = "select key from states where key in (select value from json_each(?))"
    GET = "select state from states where key = ?"
    OWNERS = "select distinct owner from state_refs order by 1"
    KEYS_OF = "select key from state_refs where owner = ? order by 1"
    COUNT = "select count(*) from states"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.WHERE = f"memory store {self.path}"
        self._lock = threading.Lock()
        try:
            uri = self.path.startswith("file:")  # e.g. "file:states.db?mode=ro" for a read-only view
            self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, uri=uri, isolation_level=None)
            self.conn.execute("pragma secure_delete = on")  # deleted states leave zeros, not their bytes
            if not self._read_only():
                self.conn.execute("pragma journal_mode = wal")
                self.conn.execute(
                    "create table if not exists states (key text primary key, state blob not null, "
                    "state_bytes integer not null, created_at real not null)"
                )
                self.conn.execute(
                    "create table if not exists state_refs (owner text not null, key text not null, "
                    "primary key (owner, key))"
                )
        except sqlite3.Error as err:
            raise StoreError(f"cannot open memory store {self.path}: {err}") from None

    def _read_only(self) -> bool:
        return "mode=ro" in self.path

    def _list(self, keys: list[str]) -> str:
        return _json_list(keys)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("rollback")

    def put(self, key: str, state: bytes | None, owner: str | None) -> None:
        """Store ``state`` under ``key`` (None: only record that ``owner`` uses the stored ``key``)."""

        def work(conn):
            conn.execute("begin immediate")
            self._insert(conn, key, state, owner)
            conn.execute("commit")

        self._run("save a state", work)

    @staticmethod
    def _insert(conn, key: str, state: bytes | None, owner: str | None) -> None:
        """The rows of one :meth:`put`, inside its transaction."""
        if state is not None:
            conn.execute("insert or ignore into states values (?, ?, ?, ?)", [key, state, len(state), time.time()])
        if owner is not None:
            conn.execute("insert or ignore into state_refs values (?, ?)", [owner, key])

    def forget(self, owner: str) -> int:
        """Drop ``owner``'s references and every state no other owner uses; returns how many states went."""

        def work(conn):
            conn.execute("begin immediate")
            keys = [row[0] for row in conn.execute("select key from state_refs where owner = ?", [owner])]
            conn.execute("delete from state_refs where owner = ?", [owner])
            gone = conn.execute(
                "delete from states where key in (select value from json_each(?)) "
                "and key not in (select key from state_refs)",
                [_json_list(keys)],
            ).rowcount
            conn.execute("commit")
            conn.execute("pragma wal_checkpoint(truncate)")
            return gone

        return self._run(f"forget thread {owner!r}", work)


class PostgresMemoryStore(_SqlStore):
    """States in a Postgres database (e.g. the checkpointer's own), shared by workers on any machine.

    Tables ``deltamem_states`` (key primary key, state bytea, state_bytes, created_at) and
    ``deltamem_state_refs`` (owner, key), created on first use. Give it a connection string; it keeps one
    autocommit connection, used under a lock.
    """

    FIND = "select key from deltamem_states where key = any(%s)"
    GET = "select state from deltamem_states where key = %s"
    OWNERS = "select distinct owner from deltamem_state_refs order by 1"
    KEYS_OF = "select key from deltamem_state_refs where owner = %s order by 1"
    COUNT = "select count(*) from deltamem_states"
    WHERE = "the Postgres memory store"

    def __init__(self, conn_string: str):
        import psycopg

        self.ERROR = psycopg.Error
        self._lock = threading.Lock()
        try:
            self.conn = psycopg.connect(conn_string, autocommit=True)
            with self.conn.transaction():
                self.conn.execute("select pg_advisory_xact_lock(7317001)")  # concurrent first uses: one creates
                self.conn.execute(
                    "create table if not exists deltamem_states (key text primary key, state bytea not null, "
                    "state_bytes integer not null, created_at double precision not null)"
                )
                self.conn.execute(
                    "create table if not exists deltamem_state_refs (owner text not null, key text not null, "
                    "primary key (owner, key))"
                )
        except psycopg.Error as err:
            raise StoreError(f"cannot open the memory store in Postgres: {err}") from None

    def _list(self, keys: list[str]) -> list[str]:
        return keys

    def put(self, key: str, state: bytes | None, owner: str | None) -> None:
        """Store ``state`` under ``key`` (None: only record that ``owner`` uses the stored ``key``)."""

        def work(conn):
            with conn.transaction():
                if state is not None:
                    conn.execute(
                        "insert into deltamem_states values (%s, %s, %s, %s) on conflict do nothing",
                        [key, state, len(state), time.time()],
                    )
                if owner is not None:
                    conn.execute("insert into deltamem_state_refs values (%s, %s) on conflict do nothing", [owner, key])

        self._run("save a state", work)

    def forget(self, owner: str) -> int:
        """Drop ``owner``'s references and every state no other owner uses; returns how many states went."""

        def work(conn):
            with conn.transaction():
                keys = [
                    r[0]
                    for r in conn.execute("delete from deltamem_state_refs where owner = %s returning key", [owner])
                ]
                return conn.execute(
                    "delete from deltamem_states s where s.key = any(%s) and not exists "
                    "(select 1 from deltamem_state_refs r where r.key = s.key)",
                    [keys],
                ).rowcount

        return self._run(f"forget thread {owner!r}", work)


def _json_list(values: list[str]) -> str:
    import json

    return json.dumps(values)
