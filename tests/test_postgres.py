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
from graph_worker import run_turns
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine

from deltamem_agents.chat import DeltaMemChat
from deltamem_agents.graph import build_chatbot

URL = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set DELTAMEM_TEST_POSTGRES_URL (bash scripts/start-postgres.sh)")
WORKER = Path(__file__).parent / "postgres_worker.py"


class Worker:
    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several workers on a few cores: no thread oversubscription
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), URL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
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


@pytest.fixture(scope="module")
def alone():
    """Memory after running each thread alone, in this process, on an in-memory checkpointer."""
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    return lambda thread, turns: run_turns(graph, thread, 1, turns)


def test_two_workers_alternating_turns_give_single_process_memory(alone):
    threads = [f"alt-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    workers = [Worker(), Worker()]
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


def test_hundred_threads_five_turns_four_workers_no_leakage(alone):
    run = uuid.uuid4().hex[:8]
    threads = [f"load-{run}-{i}" for i in range(100)]
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
