"""A worker that can be SIGKILLed in the middle of a turn (used by test_faults.py).

usage: python fault_worker.py MODE DB THREAD TURN [MARKER]
MODE: graph-run        run user turn TURN through a chatbot graph over DB: SqliteSaver(path) or, for a
                       postgresql:// URL, PostgresSaver(url)
      graph-resume     resume the thread's pending run (invoke(None)) after a crash
      store-run        run turn TURN standalone (no checkpointer) with SqliteMemoryStore(DB)
The memory states live beside the checkpoints: SqliteMemoryStore(DB) or PostgresMemoryStore(url).
MARKER: if given, touch it and hang (so the parent can kill us) at the point named by $FAULT_AT:
      "generation" (first decoded token) or "checkpoint" (inside the write of the turn's final checkpoint or,
      standalone, of the memory state's row, before it commits).
Prints "REPLY\\t<text>" and "MEMORY\\t<hex>" when it completes (store-run also "STATES\\t<thread's states>").
"""

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from graph_worker import user_turn  # noqa: E402
from langchain_core.messages import AIMessage  # noqa: E402
from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from tiny_chat import tiny_engine  # noqa: E402

from deltamem_agents.agents.chat import DeltaMemChat  # noqa: E402
from deltamem_agents.agents.graph import build_chatbot  # noqa: E402
from deltamem_agents.agents.store import PostgresMemoryStore, SqliteMemoryStore  # noqa: E402
from deltamem_agents.serving.engine import MemoryEngine, TextPiece  # noqa: E402


def hang(marker: str) -> None:
    Path(marker).touch()
    time.sleep(600)


def install_fault(marker: str, turn: int) -> None:
    where = os.environ.get("FAULT_AT", "generation")
    if where == "generation":
        original = MemoryEngine.stream

        def stream(self, *args, **kwargs):
            for event in original(self, *args, **kwargs):
                if isinstance(event, TextPiece):
                    hang(marker)
                yield event

        MemoryEngine.stream = stream
    elif where == "checkpoint":
        import langgraph.checkpoint.postgres as postgres

        original_put = SqliteSaver.put
        original_metadata = postgres.get_serializable_checkpoint_metadata
        original_insert = SqliteMemoryStore._insert

        def put(self, config, checkpoint, metadata, new_versions):
            if len(checkpoint["channel_values"].get("messages", [])) == 2 * turn:  # the turn's final checkpoint
                hang(marker)
            return original_put(self, config, checkpoint, metadata, new_versions)

        def metadata(config, metadata):
            # PostgresSaver.put calls this after sending the blobs (messages, memory) and before the
            # checkpoint row, inside its pipeline: the kill lands in the middle of the write
            if metadata.get("source") == "loop":
                hang(marker)
            return original_metadata(config, metadata)

        def insert(conn, *args):
            original_insert(conn, *args)  # the rows are written, not yet committed
            if os.environ.get("FAULT_MODE") == "store-run":
                hang(marker)

        SqliteSaver.put = put
        postgres.get_serializable_checkpoint_metadata = metadata
        SqliteMemoryStore._insert = staticmethod(insert)
    else:
        raise SystemExit(f"unknown FAULT_AT {where!r}")


@contextmanager
def open_saver(db: str):
    if db.startswith("postgresql://"):
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(db) as saver:
            saver.setup()
            yield saver
    else:
        with SqliteSaver.from_conn_string(db) as saver:
            yield saver


def conversation(thread: str, turn: int) -> list:
    """The standalone conversation up to user turn ``turn`` (assistant turns are fixed texts)."""
    messages = []
    for t in range(1, turn + 1):
        messages.append(user_turn(thread, t))
        if t < turn:
            messages.append(AIMessage(f"answer {t}", id=f"{thread}-a{t}"))
    return messages


def main() -> None:
    mode, db, thread, turn = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.environ["FAULT_MODE"] = mode
    if len(sys.argv) > 5:
        install_fault(sys.argv[5], turn)
    store = PostgresMemoryStore(db) if db.startswith("postgresql://") else SqliteMemoryStore(db)
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=store)
    config = {"configurable": {"thread_id": thread}}
    if mode.startswith("graph"):
        with open_saver(db) as saver:
            graph = build_chatbot(chat, checkpointer=saver)
            inputs = None if mode == "graph-resume" else {"messages": [user_turn(thread, turn)]}
            state = graph.invoke(inputs, config)
        print(f"REPLY\t{state['messages'][-1].content!r}")
        print(f"MEMORY\t{chat.stored_memory(state['messages']).hex()}")
    else:
        messages = conversation(thread, turn)
        reply = chat.invoke(messages, config)
        print(f"REPLY\t{reply.content!r}")
        print(f"MEMORY\t{chat.stored_memory(messages).hex()}")
        print(f"STATES\t{len(store.keys_of(thread))}")


if __name__ == "__main__":
    main()
