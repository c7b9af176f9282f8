"""A worker killed (SIGKILL) in the middle of a turn: after a restart the thread continues from its last
committed state, nothing is written into memory twice or skipped, and the next answer is the same as that of a
run that was never killed (SQLite and Postgres checkpointers, and the standalone store). Also: a full disk or a
read-only database gives a clear error and keeps the previous state readable."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "fault_worker.py"


def run(*args, env=None) -> dict:
    out = subprocess.run(
        [sys.executable, str(WORKER), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    return dict(line.split("\t", 1) for line in out.stdout.splitlines() if "\t" in line)


def kill_midway(args, marker: Path, fault_at: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_AT": fault_at}
    process = subprocess.Popen([sys.executable, str(WORKER), *args, str(marker)], env=env)
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None, "the worker ended before reaching the fault point"
        assert time.time() < deadline, "the worker never reached the fault point"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("fault_at", ["generation", "checkpoint"])
def test_graph_turn_killed_midway_resumes_identically(tmp_path, fault_at):
    straight = str(tmp_path / "straight.db")
    for turn in (1, 2, 3):
        expected = run("graph-run", straight, "t", str(turn))
    crashed = str(tmp_path / "crashed.db")
    for turn in (1, 2):
        run("graph-run", crashed, "t", str(turn))
    kill_midway(["graph-run", crashed, "t", "3"], tmp_path / "marker", fault_at)
    resumed = run("graph-resume", crashed, "t", "3")
    assert resumed == expected


POSTGRES = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="set DELTAMEM_TEST_POSTGRES_URL (bash scripts/start-postgres.sh)")
@pytest.mark.parametrize("fault_at", ["generation", "checkpoint"])
def test_postgres_turn_killed_midway_resumes_identically(tmp_path, fault_at):
    """The same kill on the shared Postgres checkpointer; the run never killed is on SQLite: the memory and the
    answer do not depend on which checkpointer holds them."""
    thread = f"kill-{uuid.uuid4().hex[:8]}"
    straight = str(tmp_path / "straight.db")
    for turn in (1, 2, 3):
        expected = run("graph-run", straight, thread, str(turn))
    for turn in (1, 2):
        run("graph-run", POSTGRES, thread, str(turn))
    kill_midway(["graph-run", POSTGRES, thread, "3"], tmp_path / "marker", fault_at)
    resumed = run("graph-resume", POSTGRES, thread, "3")
    from langgraph.checkpoint.postgres import PostgresSaver

    from deltamem_agents.agents.store import PostgresMemoryStore

    with PostgresSaver.from_conn_string(POSTGRES) as saver:
        saver.delete_thread(thread)  # leave the shared database as we found it
    PostgresMemoryStore(POSTGRES).forget(thread)
    assert resumed == expected


@pytest.mark.parametrize("fault_at", ["generation", "checkpoint"])
def test_standalone_store_turn_killed_midway_resumes_identically(tmp_path, fault_at):
    straight = str(tmp_path / "straight.db")
    for turn in (1, 2, 3):
        expected = run("store-run", straight, "s", str(turn))
    crashed = str(tmp_path / "crashed.db")
    for turn in (1, 2):
        run("store-run", crashed, "s", str(turn))
    kill_midway(["store-run", crashed, "s", "3"], tmp_path / "marker", fault_at)
    again = run("store-run", crashed, "s", "3")
    assert again == expected
    assert expected["STATES"] == "2"  # one state per turn that had older messages: none lost, none twice


def test_read_only_store_gives_a_clear_error_and_keeps_the_state(tmp_path):
    from langchain_core.messages import AIMessage, HumanMessage
    from tiny_chat import tiny_engine

    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.store import SqliteMemoryStore, StoreError

    path = tmp_path / "store.db"
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=4, store=SqliteMemoryStore(path))
    config = {"configurable": {"thread_id": "ro"}}
    first = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    chat.invoke(first, config)
    before = chat.stored_memory(first)
    chat.store.close()
    os.chmod(path, 0o444)
    chat.store = SqliteMemoryStore(f"file:{path}?mode=ro")  # root ignores file modes: open it read-only
    more = first + [AIMessage("d", id="4"), HumanMessage("e", id="5")]
    with pytest.raises(StoreError, match="readonly database; what it held is unchanged"):
        chat.invoke(more, config)
    assert chat.stored_memory(first) == before and chat.stored_memory(more) is None
    os.chmod(path, 0o644)
    assert SqliteMemoryStore(path).keys_of("ro") == chat.store.keys_of("ro") and len(chat.store) == 1


def fill_the_disk(connection) -> None:
    """Cap the database at its current size: the next write that needs a page fails with SQLITE_FULL, exactly
    the error a full disk gives."""
    pages = connection.execute("pragma page_count").fetchone()[0]
    connection.execute(f"pragma max_page_count = {pages}")


def test_full_disk_store_gives_a_clear_error_and_keeps_the_state(tmp_path):
    from langchain_core.messages import AIMessage, HumanMessage
    from tiny_chat import tiny_engine

    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.store import SqliteMemoryStore, StoreError

    path = tmp_path / "store.db"
    store = SqliteMemoryStore(path)
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=4, store=store)
    config = {"configurable": {"thread_id": "full"}}
    first = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    store.put("padding", b"p" * 2900, None)  # the states' page is nearly full: the next state needs a new page
    chat.invoke(first, config)
    before = chat.stored_memory(first)
    fill_the_disk(store.conn)
    more = first + [AIMessage("d", id="4"), HumanMessage("e", id="5")]
    with pytest.raises(StoreError, match="database or disk is full; what it held is unchanged"):
        chat.invoke(more, config)
    assert chat.stored_memory(first) == before and chat.stored_memory(more) is None
    fresh_connection = SqliteMemoryStore(path)
    assert len(fresh_connection) == 2 and fresh_connection.keys_of("full") == store.keys_of("full")
    store.conn.execute("pragma max_page_count = 1073741823")  # space again: the thread goes on
    chat.invoke(more, config)
    assert chat.stored_memory(more) is not None and len(store.keys_of("full")) == 2


FAILURES = {  # how to break the database, SQLite's own message, how to mend it
    "full-disk": (fill_the_disk, "database or disk is full", "pragma max_page_count = 1073741823"),
    "read-only": (
        lambda c: c.execute("pragma query_only = on"),
        "attempt to write a readonly database",
        "pragma query_only = off",
    ),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failing_checkpointer_keeps_the_last_checkpoint_and_continues_identically(tmp_path, failure):
    """SqliteSaver on a full disk or a read-only database: LangGraph raises SQLite's own error, the thread's
    last committed checkpoint is still what get_state returns, and once writes work again the thread continues
    exactly as a run that never saw the error."""
    import sqlite3

    from graph_worker import run_turns, user_turn
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver
    from tiny_chat import tiny_engine

    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.graph import build_chatbot

    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)
    config = {"configurable": {"thread_id": "disk"}}
    connection = sqlite3.connect(tmp_path / "cp.db", check_same_thread=False)
    saver = SqliteSaver(connection)
    graph = build_chatbot(chat, checkpointer=saver)
    run_turns(graph, "disk", 1, 2, chat)
    before = graph.get_state(config)
    break_it, message, mend = FAILURES[failure]
    break_it(connection)
    with pytest.raises(sqlite3.OperationalError, match=message):
        graph.invoke({"messages": [user_turn("disk", 3)]}, config)
    after = graph.get_state(config)
    assert after.values == before.values and after.config == before.config
    connection.execute(mend)
    resumed = run_turns(graph, "disk", 3, 3, chat)
    never_failed = run_turns(build_chatbot(chat, checkpointer=InMemorySaver()), "disk", 1, 3, chat)
    assert resumed == never_failed
