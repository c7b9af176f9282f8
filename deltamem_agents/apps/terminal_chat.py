"""``deltamem chat``: a terminal chat whose messages (checkpoints) and memory states persist in one SQLite file."""

import sys
from pathlib import Path

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.sqlite import SqliteSaver

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot
from deltamem_agents.agents.store import SqliteMemoryStore
from deltamem_agents.agents.turn import messages_in_memory
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import deltamem_home


def run_terminal_chat(thread: str, db: str | None, backbone: str, adapter: str | None, max_new_tokens: int) -> int:
    """A terminal chat on a one-node graph whose checkpoints (messages) and memory states live in ``db``."""
    path = Path(db) if db else deltamem_home() / "chat.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteMemoryStore(path)  # its own tables beside the checkpointer's
    chat = DeltaMemChat.from_backbone(backbone, adapter=adapter, max_new_tokens=max_new_tokens, store=store)
    config = {"configurable": {"thread_id": thread}}
    with SqliteSaver.from_conn_string(str(path)) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        earlier = graph.get_state(config).values.get("messages", [])
        chat_loop(graph, config, f"thread {thread!r} in {path} ({len(earlier)} earlier messages).", chat)
    return 0


def chat_loop(graph, config: dict, banner: str) -> None:
    """Read lines from stdin and stream the graph's replies (and tool calls) until an empty line or end of
    input; after each turn, show how many messages the thread's memory holds."""
    print(f"{banner} Empty line or Ctrl-D to quit.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        print("bot> ", end="", flush=True)
        for message, _meta in graph.stream({"messages": [HumanMessage(text)]}, config, stream_mode="messages"):
            if message.type != "tool" and message.content:
                print(message.content, end="", flush=True)
            for call in getattr(message, "tool_calls", None) or []:
                print(f"[tool call: {call['name']} {call['args']}]", end="", flush=True)
        messages = graph.get_state(config).values.get("messages", [])
        print(f"\n     [memory: {messages_in_memory(messages)} messages]")


if __name__ == "__main__":
    sys.exit(run_terminal_chat(sys.argv[1], None, DEFAULT_BACKBONE, None, 200))
