"""Runs turns of a chatbot graph over a SQLite checkpoint file, in its own process (used by test_graph.py).

usage: python graph_worker.py DB THREAD FIRST_TURN LAST_TURN   -> prints the final memory bytes as hex

The memory states live in the same SQLite file as the checkpoints (a SqliteMemoryStore beside the saver).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from langchain_core.messages import HumanMessage  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from tiny_chat import tiny_engine  # noqa: E402

from deltamem_agents.agents.chat import DeltaMemChat  # noqa: E402
from deltamem_agents.agents.graph import build_chatbot  # noqa: E402
from deltamem_agents.agents.store import InMemoryStore, SqliteMemoryStore  # noqa: E402


def user_turn(thread: str, turn: int) -> HumanMessage:
    return HumanMessage(f"{thread} says message number {turn}", id=f"{thread}-u{turn}")


def run_turns(graph, thread: str, first: int, last: int, chat: DeltaMemChat) -> bytes:
    """Run turns ``first..last`` of ``thread``; the stored memory bytes of the last turn (what it read)."""
    config = {"configurable": {"thread_id": thread}}
    for turn in range(first, last + 1):
        state = graph.invoke({"messages": [user_turn(thread, turn)]}, config)
    memory = chat.stored_memory(state["messages"])
    assert memory is not None, "the turn stored no memory state"
    return memory


def fresh(chat: DeltaMemChat) -> DeltaMemChat:
    """The same chat model with an empty in-memory store: a reference that cannot read states stored by the
    run it is compared with, so it computes every state itself."""
    return chat.model_copy(update={"store": InMemoryStore()})


def main() -> None:
    db, thread, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=SqliteMemoryStore(db))
    with SqliteSaver.from_conn_string(db) as saver:
        memory = run_turns(build_chatbot(chat, checkpointer=saver), thread, first, last, chat)
    print(memory.hex())


if __name__ == "__main__":
    main()
