"""A worker killed (SIGKILL) in the middle of a turn: after a restart the thread continues from its last
committed state, nothing is written into memory twice or skipped, and the next answer is the same as that of a
run that was never killed. Also: a read-only database gives a clear error and keeps the previous state."""

import os
import signal
import subprocess
import sys
import time
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


def test_standalone_store_turn_killed_midway_resumes_identically(tmp_path):
    straight = str(tmp_path / "straight.db")
    for turn in (1, 2, 3):
        expected = run("store-run", straight, "s", str(turn))
    crashed = str(tmp_path / "crashed.db")
    for turn in (1, 2):
        run("store-run", crashed, "s", str(turn))
    kill_midway(["store-run", crashed, "s", "3"], tmp_path / "marker", "generation")
    again = run("store-run", crashed, "s", "3")
    assert again == expected
    assert expected["WRITTEN"] == "s-u1,s-a1,s-u2,s-a2"  # every older message once, in order


def test_read_only_store_gives_a_clear_error_and_keeps_the_state(tmp_path):
    from langchain_core.messages import AIMessage, HumanMessage
    from tiny_chat import tiny_engine

    from deltamem_agents.chat import DeltaMemChat
    from deltamem_agents.store import SqliteMemoryStore, StoreError

    path = tmp_path / "store.db"
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=4, store=SqliteMemoryStore(path))
    config = {"configurable": {"thread_id": "ro"}}
    first = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    chat.invoke(first, config)
    before = chat.store.load("ro")
    chat.store.close()
    os.chmod(path, 0o444)
    chat.store = SqliteMemoryStore(f"file:{path}?mode=ro")  # root ignores file modes: open it read-only
    more = first + [AIMessage("d", id="4"), HumanMessage("e", id="5")]
    with pytest.raises(StoreError, match="previous state is unchanged"):
        chat.invoke(more, config)
    assert chat.store.load("ro") == before
    os.chmod(path, 0o644)
    assert SqliteMemoryStore(path).load("ro") == before
