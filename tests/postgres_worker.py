"""A worker process serving chatbot turns over a shared Postgres checkpointer (used by test_postgres.py).

usage: python postgres_worker.py URL
stdin lines: "THREAD FIRST LAST" -> runs those turns of THREAD, answers "THREAD MEMORY_HEX"; "quit" ends.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from graph_worker import run_turns  # noqa: E402
from langgraph.checkpoint.postgres import PostgresSaver  # noqa: E402
from tiny_chat import tiny_engine  # noqa: E402

from deltamem_agents.agents.chat import DeltaMemChat  # noqa: E402
from deltamem_agents.agents.graph import build_chatbot  # noqa: E402


def main() -> None:
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)
    with PostgresSaver.from_conn_string(sys.argv[1]) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            thread, first, last = line.split()
            memory = run_turns(graph, thread, int(first), int(last))
            print(f"{thread} {memory.hex()}", flush=True)


if __name__ == "__main__":
    main()
