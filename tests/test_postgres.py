"""Many workers sharing one Postgres checkpoint database: identical memory, no leakage between users.

Needs a server: ``bash scripts/start-postgres.sh`` prints the URL; set DELTAMEM_TEST_POSTGRES_URL to it
(.ci/run does both). Skipped without it.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from graph_worker import run_turns, user_turn
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot
from deltamem_agents.agents.store import PostgresMemoryStore

URL = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set DELTAMEM_TEST_POSTGRES_URL (bash scripts/start-postgres.sh)")
WORKER = Path(__file__).parent / "postgres_worker.py"


class Worker:
    def __init__(self, setup: str = "build_chatbot"):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several workers on a few cores: no thread oversubscription
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), URL, setup],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def send(self, thread: str, first: int, last: int) -> None:
        self.process.stdin.write(f"{thread} {first} {last}\n")
        self.process.stdin.flush()

    def receive(self) -> tuple[str, bytes]:
        thread, hex_memory = self.process.stdout.readline().split()
        return thread, bytes.fromhex(hex_memory)

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)


@pytest.fixture
def forget_afterwards():
    """Threads appended to the returned list are deleted from the shared database when the test ends."""
    from langgraph.checkpoint.postgres import PostgresSaver

    threads: list[str] = []
    yield threads
    store = PostgresMemoryStore(URL)
    with PostgresSaver.from_conn_string(URL) as saver:
        for thread in threads:
            saver.delete_thread(thread)
            store.forget(thread)


@pytest.fixture(scope="module")
def alone():
    """Memory after running turns 1..n of a thread alone, in this process, on a fresh in-memory checkpointer and
    a store of its own (so every state it reads, it computed itself)."""
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)
    return lambda thread, turns: run_turns(build_chatbot(chat, checkpointer=InMemorySaver()), thread, 1, turns, chat)


@pytest.mark.parametrize("setup", ["build_chatbot", "create_agent"])
def test_two_workers_alternating_turns_give_single_process_memory(alone, forget_afterwards, setup):
    threads = [f"alt-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    forget_afterwards.extend(threads)
    workers = [Worker(setup), Worker(setup)]
    try:
        final = {}
        for turn in range(1, 5):
            worker = workers[turn % 2]  # turns alternate between the two processes
            for thread in threads:
                worker.send(thread, turn, turn)
                name, memory = worker.receive()
                final[name] = memory
    finally:
        for w in workers:
            w.close()
    for thread in threads:
        assert final[thread] == alone(thread, 4)
    store = PostgresMemoryStore(URL)
    assert all(len(store.keys_of(thread)) == 3 for thread in threads)  # turns 2-4, each stored once


def test_hundred_threads_five_turns_four_workers_no_leakage(alone, forget_afterwards):
    run = uuid.uuid4().hex[:8]
    threads = [f"load-{run}-{i}" for i in range(100)]
    forget_afterwards.extend(threads)
    workers = [Worker() for _ in range(4)]
    final = {}
    try:
        for turn in range(1, 6):  # every worker has its threads' turn `turn` in flight at the same time
            for i, thread in enumerate(threads):
                workers[i % 4].send(thread, turn, turn)
            for i, _ in enumerate(threads):
                name, memory = workers[i % 4].receive()
                final[name] = memory
    finally:
        for w in workers:
            w.close()
    assert sorted(final) == sorted(threads)
    for thread in threads:
        assert final[thread] == alone(thread, 5), thread


async def test_async_saver_concurrent_threads_then_a_sync_worker_match_alone(alone, forget_afterwards):
    """AsyncPostgresSaver: 12 threads' first two turns run concurrently in this event loop; a separate worker
    process on the sync PostgresSaver continues them; the final bytes equal each thread run alone."""
    import asyncio

    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    threads = [f"async-{uuid.uuid4().hex[:8]}-{i}" for i in range(12)]
    forget_afterwards.extend(threads)
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=PostgresMemoryStore(URL))
    async with AsyncPostgresSaver.from_conn_string(URL) as saver:
        await saver.setup()
        graph = build_chatbot(chat, checkpointer=saver)

        async def two_turns(thread):
            config = {"configurable": {"thread_id": thread}}
            for turn in (1, 2):
                state = await graph.ainvoke({"messages": [user_turn(thread, turn)]}, config)
            return chat.stored_memory(state["messages"])

        halfway = await asyncio.gather(*(two_turns(t) for t in threads))
    for thread, memory in zip(threads, halfway):
        assert memory == alone(thread, 2), thread
    worker = Worker()
    try:
        for thread in threads:
            worker.send(thread, 3, 4)
        final = dict(worker.receive() for _ in threads)
    finally:
        worker.close()
    for thread in threads:
        assert final[thread] == alone(thread, 4), thread


def test_a_read_only_database_gives_a_clear_error_and_keeps_the_last_checkpoint(alone, forget_afterwards):
    """A Postgres session in read-only mode (a replica, or the database switched read-only): the turn fails
    with Postgres' own error, the thread's last committed checkpoint stays readable, and once writes work
    again the thread continues exactly as if nothing had happened."""
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    thread = f"ro-{uuid.uuid4().hex[:8]}"
    forget_afterwards.append(thread)
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=PostgresMemoryStore(URL))
    config = {"configurable": {"thread_id": thread}}
    with PostgresSaver.from_conn_string(URL) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        run_turns(graph, thread, 1, 2, chat)
        before = graph.get_state(config)
    read_only = URL + ("&" if "?" in URL else "?") + "options=-c%20default_transaction_read_only%3Don"
    with PostgresSaver.from_conn_string(read_only) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="read-only transaction"):
            graph.invoke({"messages": [user_turn(thread, 3)]}, config)
        still = graph.get_state(config)  # reads work on the read-only session
    assert still.values == before.values and still.config == before.config
    with PostgresSaver.from_conn_string(URL) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        assert run_turns(graph, thread, 3, 3, chat) == alone(thread, 3)


def test_forget_thread_removes_every_row_and_state_of_the_thread(alone, forget_afterwards):
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    from deltamem_agents.agents.graph import forget_thread

    gone, kept = f"forget-{uuid.uuid4().hex[:8]}", f"keep-{uuid.uuid4().hex[:8]}"
    forget_afterwards.append(kept)
    store = PostgresMemoryStore(URL)
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=store)
    with PostgresSaver.from_conn_string(URL) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        for thread in (gone, kept):
            run_turns(graph, thread, 1, 3, chat)
        secrets = [store.get(key) for key in store.keys_of(gone)]
        assert len(secrets) == 2 and forget_thread(saver, chat, gone) == 2
    tables = {"checkpoints": "thread_id", "checkpoint_blobs": "thread_id", "checkpoint_writes": "thread_id"}
    tables["deltamem_state_refs"] = "owner"
    with psycopg.connect(URL) as connection:
        count = {
            (table, thread): connection.execute(
                f"select count(*) from {table} where {column} = %s", [thread]
            ).fetchone()[0]
            for table, column in tables.items()
            for thread in (gone, kept)
        }
        # the state bytes themselves are gone too: no blob and no stored state holds the deleted memory
        for secret in secrets:
            for table, column in (("checkpoint_blobs", "blob"), ("deltamem_states", "state")):
                query = f"select count(*) from {table} where position(%s in {column}) > 0"
                assert connection.execute(query, [secret]).fetchone()[0] == 0, table
    assert all(count[(table, gone)] == 0 for table in tables), count
    assert count[("checkpoints", kept)] > 0 and count[("deltamem_state_refs", kept)] == 2
