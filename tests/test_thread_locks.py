"""Per-thread locks: one turn of a conversation thread at a time, other threads free, nothing kept after."""

import threading
import time

from langchain_core.messages import AIMessage, HumanMessage
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import THREAD_LOCKS, DeltaMemChat
from deltamem_agents.serving.thread_locks import ThreadLocks


def overlapping(locks: ThreadLocks, keys: list[str]) -> bool:
    """Run one block per key in its own OS thread; True if any two blocks were inside at the same time."""
    inside, most = [0], [0]
    guard = threading.Lock()

    def work(key):
        with locks.hold(key):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    workers = [threading.Thread(target=work, args=(key,)) for key in keys]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return most[0] > 1


def test_the_same_key_is_serialised_and_other_keys_are_not():
    locks = ThreadLocks()
    assert not overlapping(locks, ["alice"] * 4)
    assert overlapping(locks, ["alice", "bob", "carol", "dave"])
    assert len(locks) == 0  # nothing kept once every block has left


def test_the_lock_is_released_when_the_block_raises():
    locks = ThreadLocks()
    try:
        with locks.hold("x"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert len(locks) == 0
    with locks.hold("x"):  # not left held
        pass


def test_many_standalone_threads_leave_no_locks_behind():
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=2)
    for i in range(30):
        history = [HumanMessage(f"hi {i}"), AIMessage("hello"), HumanMessage("again")]
        chat.invoke(history, {"configurable": {"thread_id": f"user-{i}"}})
    assert len(chat.store.owners()) == 30 and len(THREAD_LOCKS) == 0
