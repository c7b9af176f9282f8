"""One rule in every common setup: the memory a turn reads is exactly the memory of the messages the setup holds
at that point — across processes, forks, time travel and deletes — and byte-identical to the library's own graph.

Setups (tests/setups.py): build_chatbot, build_agent, memory_node and a bare model node in
StateGraph(MessagesState), create_react_agent, create_agent with DeltaMemMiddleware, RunnableWithMessageHistory
keyed by session_id.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from graph_worker import fresh
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from setups import CHECKPOINTED, SCRIPT, SETUPS, JsonFileHistory, graph_of, turn_runner
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot, forget_thread
from deltamem_agents.agents.store import SqliteMemoryStore

WORKER = Path(__file__).parent / "setups_worker.py"


@pytest.fixture(scope="module")
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)


def reference(chat) -> list[tuple[bytes, int]]:
    """Per turn of SCRIPT in the library's own graph, in this process: (memory the turn read, tokens written)."""
    chat = fresh(chat)
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "reference"}}
    out = []
    for text in SCRIPT:
        messages = graph.invoke({"messages": [HumanMessage(text)]}, config)["messages"]
        out.append((chat.stored_memory(messages), messages[-1].response_metadata["memory_tokens_written"]))
    return out


def test_every_setup_with_each_turn_in_a_new_process_matches_the_librarys_graph(tmp_path, chat):
    expected = reference(chat)
    for turn in range(1, len(SCRIPT) + 1):
        out = subprocess.run(
            [sys.executable, str(WORKER), str(tmp_path), str(turn)], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results = json.loads(out.stdout)
        memory, tokens = expected[turn - 1]
        for setup in SETUPS:
            got = results[setup]
            assert got["messages"] == 2 * turn, setup  # the setup held the whole conversation, nothing more
            assert got["memory"] == memory.hex(), (setup, turn)  # byte for byte
            assert got["tokens"] == tokens, (setup, turn)  # only the previous turn's pair: the rest was stored
    assert expected[0][1] == 0 and all(tokens > 0 for _, tokens in expected[1:])


@pytest.mark.parametrize("setup", CHECKPOINTED)
def test_fork_time_travel_and_delete(setup, tmp_path, chat):
    path = tmp_path / "cp.db"
    chat = chat.model_copy(update={"store": SqliteMemoryStore(path)})  # in the checkpointer's own file
    truth = fresh(chat)  # computes every memory from scratch
    config = {"configurable": {"thread_id": "t"}}
    with SqliteSaver.from_conn_string(str(path)) as saver:
        graph = graph_of(setup, chat, saver)
        turns = [graph.invoke({"messages": [HumanMessage(text)]}, config)["messages"] for text in SCRIPT[:3]]
        memories = [chat.stored_memory(messages) for messages in turns]
        assert all(memories[i] == truth.memory_of(turns[i]).to_bytes() for i in range(3))
        history = list(graph.get_state_history(config))
        # time travel: every checkpoint reads the memory of its own messages
        for snapshot in history:
            messages = snapshot.values.get("messages", [])
            if any(m.type == "human" for m in messages):
                assert chat.memory_of(messages).to_bytes() == truth.memory_of(messages).to_bytes()
        # replay turn 3 from the checkpoint before its model call: the same memory, so the same reply
        before_reply = next(s for s in history if len(s.values.get("messages", [])) == 5 and s.next)
        replayed = graph.invoke(None, before_reply.config)["messages"]
        assert replayed[-1].text == turns[2][-1].text
        # fork from the end of turn 2: it reads turns 1-2 (stored by the old turn 3), not the abandoned turn 3
        after_two = next(s for s in history if len(s.values.get("messages", [])) == 4)
        forked = graph.invoke({"messages": [HumanMessage("a different third turn")]}, after_two.config)["messages"]
        assert chat.stored_memory(forked) == memories[2]
        assert forked[-1].response_metadata["memory_tokens_written"] == 0
        forked = graph.invoke({"messages": [HumanMessage("and a fourth")]}, graph.get_state(config).config)["messages"]
        fork_memory = chat.stored_memory(forked)
        assert fork_memory == truth.memory_of(forked).to_bytes()
        assert [m.text for m in forked[4:6]] != [m.text for m in turns[2][4:6]]  # it did write the fork's turn 3
        original = graph.get_state(history[0].config).values["messages"]
        assert chat.stored_memory(original) == memories[2]  # the original branch is untouched
        # delete: the checkpoints and every state of the thread, from the tables and the files
        stored = len(chat.store)
        assert stored == 3 and forget_thread(saver, chat, "t") == stored
        assert graph.get_state(config).values == {} and len(chat.store) == 0
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert all(memory not in files for memory in (*memories[1:], fork_memory))


def test_message_history_fork_and_forget(tmp_path, chat):
    """RunnableWithMessageHistory keyed by session_id: a session copied from another's first two turns (a fork)
    reads their memory; forgetting one session keeps what the other still uses."""
    path = tmp_path / "states.db"
    chat = chat.model_copy(update={"store": SqliteMemoryStore(path)})
    truth = fresh(chat)
    turn = turn_runner("message_history", chat, histories=tmp_path)
    turns = [turn("a", text) for text in SCRIPT[:3]]
    assert chat.stored_memory(turns[2]) == truth.memory_of(turns[2]).to_bytes()
    JsonFileHistory(tmp_path / "b.json").add_messages(turns[1])  # session b starts as a copy of a's turns 1-2
    forked = turn("b", "something else")
    assert chat.stored_memory(forked) == chat.stored_memory(turns[2])  # the same messages 1-4: the same memory
    assert forked[-1].response_metadata["memory_tokens_written"] == 0
    assert chat.store.owners() == ["a", "b"]
    secret, shared = chat.stored_memory(turns[1]), chat.stored_memory(turns[2])  # turn 1's pair: only a used it
    assert chat.forget("a") == 1 and chat.stored_memory(turns[2]) == shared  # b still uses turns 1-2's state
    assert secret not in path.read_bytes()
    assert chat.forget("b") == 1 and len(chat.store) == 0
    assert shared not in b"".join(p.read_bytes() for p in tmp_path.iterdir())
