"""A worker process serving chatbot turns over a shared Postgres checkpointer (used by test_postgres.py).

usage: python postgres_worker.py URL [SETUP]   (SETUP: one of tests/setups.py CHECKPOINTED; build_chatbot by default)
stdin lines: "THREAD FIRST LAST" -> runs those turns of THREAD, answers "THREAD MEMORY_HEX"; "quit" ends.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from graph_worker import run_turns  # noqa: E402
from langgraph.checkpoint.postgres import PostgresSaver  # noqa: E402
from setups import graph_of  # noqa: E402
from tiny_chat import tiny_engine  # noqa: E402

from deltamem_agents.agents.chat import DeltaMemChat  # noqa: E402
from deltamem_agents.agents.store import PostgresMemoryStore  # noqa: E402


def main() -> None:
    store = PostgresMemoryStore(sys.argv[1])  # the memory states, in the checkpointer's database
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2, store=store)
    with PostgresSaver.from_conn_string(sys.argv[1]) as saver:
        graph = graph_of(sys.argv[2] if len(sys.argv) > 2 else "build_chatbot", chat, saver)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            thread, first, last = line.split()
            memory = run_turns(graph, thread, int(first), int(last), chat)
            print(f"{thread} {memory.hex()}", flush=True)


if __name__ == "__main__":
    main()
