"""Runs one turn of the 5-turn script through every setup of tests/setups.py, in its own process (used by
test_setups.py): each setup keeps its checkpoints (or message history) and its memory states in its own SQLite
files under DIR, so each turn starts from what the previous process left there.

usage: python setups_worker.py DIR TURN   -> prints {setup: {"memory": hex, "tokens": tokens written}} as JSON
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: E402
from setups import SCRIPT, SETUPS, turn_runner  # noqa: E402
from tiny_chat import tiny_engine  # noqa: E402

from deltamem_agents.agents.chat import DeltaMemChat  # noqa: E402
from deltamem_agents.agents.store import SqliteMemoryStore  # noqa: E402

THREAD = "user-1"


def chat_for(engine, states: Path) -> DeltaMemChat:
    return DeltaMemChat(engine=engine, max_new_tokens=6, window_messages=2, store=SqliteMemoryStore(states))


def main() -> None:
    folder, turn = Path(sys.argv[1]), int(sys.argv[2])
    engine = tiny_engine()
    out = {}
    for setup in SETUPS:
        chat = chat_for(engine, folder / f"{setup}.states.db")
        with SqliteSaver.from_conn_string(str(folder / f"{setup}.db")) as saver:
            (folder / "histories").mkdir(exist_ok=True)
            messages = turn_runner(setup, chat, saver, folder / "histories")(THREAD, SCRIPT[turn - 1])
        memory = chat.stored_memory(messages)
        tokens = messages[-1].response_metadata["memory_tokens_written"]
        out[setup] = {"memory": memory.hex() if memory else None, "tokens": tokens, "messages": len(messages)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
