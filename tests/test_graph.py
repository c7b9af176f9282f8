"""LangGraph integration: every checkpoint's turn reads the memory of exactly that checkpoint's messages, on every
checkpointer, across processes, time travel, forks and deletes."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from graph_worker import fresh, run_turns, user_turn
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from tiny_chat import Script, tiny_engine

from deltamem_agents import MemoryState
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_agent, build_chatbot, forget_thread
from deltamem_agents.agents.store import SqliteMemoryStore

WORKER = Path(__file__).parent / "graph_worker.py"


@pytest.fixture(scope="module")
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=6, window_messages=2)


def test_the_memory_follows_the_turns_and_stays_out_of_the_state(chat):
    chat = fresh(chat)
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    state = graph.invoke({"messages": [user_turn("t", 1)]}, config)
    assert set(state) == {"messages"}  # no memory, key or watermark in the graph state
    assert MemoryState.from_bytes(chat.stored_memory(state["messages"])).is_zero()
    assert state["messages"][-1].response_metadata["memory_tokens_written"] == 0
    state = graph.invoke({"messages": [user_turn("t", 2)]}, config)
    assert state["messages"][-1].response_metadata["memory_tokens_written"] > 0  # turn 1's question and answer
    memory = chat.stored_memory(state["messages"])
    assert not MemoryState.from_bytes(memory).is_zero() and len(memory) < 2000  # one packed state
    assert len(chat.store) == 1 and chat.store.owners() == ["t"]
    again = graph.invoke({"messages": [user_turn("t", 3)]}, config)["messages"][-1]
    assert 0 < again.response_metadata["memory_tokens_written"]  # only turn 2's pair: the rest was stored
    assert len(chat.store) == 2


def test_resume_in_a_new_process_gives_identical_memory(tmp_path, chat):
    chat = fresh(chat)
    with SqliteSaver.from_conn_string(str(tmp_path / "straight.db")) as saver:
        straight = run_turns(build_chatbot(chat, checkpointer=saver), "r", 1, 4, chat)
    db = str(tmp_path / "resumed.db")
    for first, last in [(1, 2), (3, 4)]:
        out = subprocess.run(
            [sys.executable, str(WORKER), db, "r", str(first), str(last)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
    assert bytes.fromhex(out.stdout.strip()) == straight
    assert SqliteMemoryStore(db).keys_of("r")  # the states were stored beside the checkpoints


def test_time_travel_fork_and_delete(tmp_path, chat):
    saver = InMemorySaver()
    chat = chat.model_copy(update={"store": SqliteMemoryStore(tmp_path / "states.db")})
    graph = build_chatbot(chat, checkpointer=saver)
    config = {"configurable": {"thread_id": "tt"}}
    memories = [run_turns(graph, "tt", turn, turn, chat) for turn in (1, 2, 3, 4)]
    original_tip = graph.get_state(config)
    history = list(graph.get_state_history(config))
    after_turn_2 = next(s for s in history if len(s.values.get("messages", [])) == 4)
    assert chat.stored_memory(after_turn_2.values["messages"]) == memories[1]  # the memory of that point
    fork_config = after_turn_2.config
    for turn, text in ((3, "a different turn three"), (4, "and a different four")):
        forked = graph.invoke({"messages": [HumanMessage(text, id=f"fork-{turn}")]}, fork_config)
        fork_config = graph.get_state(config).config
    fork_memory = chat.stored_memory(forked["messages"])
    assert fork_memory != memories[3]  # the fork wrote its own third turn
    reference = fresh(chat)  # the fork's messages from scratch: the same bytes
    assert reference.memory_of(forked["messages"]).to_bytes() == fork_memory
    kept = graph.get_state(original_tip.config).values  # the original branch is untouched
    assert chat.stored_memory(kept["messages"]) == memories[3] and kept["messages"][-2].id == "tt-u4"
    stored = len(chat.store)  # every state is this thread's
    assert stored == 4 and forget_thread(saver, chat, "tt") == stored  # turns 2-4, and the fork's turn 4
    assert graph.get_state(config).values == {}
    assert not list(saver.list(config))
    assert len(chat.store) == 0 and chat.store.owners() == []
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert all(memory not in files for memory in (*memories[1:], fork_memory))  # not in the file, not in the WAL


async def test_sixteen_concurrent_threads_keep_their_own_memory(tmp_path, chat):
    threads = [f"user{i}" for i in range(16)]
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "async.db")) as saver:
        chat = fresh(chat)
        graph = build_chatbot(chat, checkpointer=saver)

        async def run(thread):
            config = {"configurable": {"thread_id": thread}}
            for turn in (1, 2, 3):
                state = await graph.ainvoke({"messages": [user_turn(thread, turn)]}, config)
            return chat.stored_memory(state["messages"])

        together = await asyncio.gather(*(run(t) for t in threads))
    alone = fresh(chat)
    alone_graph = build_chatbot(alone, checkpointer=InMemorySaver())
    for thread, memory in zip(threads, together):
        assert memory == run_turns(alone_graph, thread, 1, 3, alone), thread
    assert len(set(together)) == len(threads)


async def test_astream_messages_mode_streams_tokens(chat):
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    pieces = []
    async for message, _metadata in graph.astream(
        {"messages": [HumanMessage("hello there")]}, {"configurable": {"thread_id": "s"}}, stream_mode="messages"
    ):
        pieces.append(message.content)
    final = graph.get_state({"configurable": {"thread_id": "s"}}).values["messages"][-1]
    assert len(pieces) >= 2 and "".join(pieces) == final.content


def test_agent_calls_a_tool_then_answers():
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=80)
    calls = []

    def lookup_ticket(ticket_id: int) -> str:
        """Look up a support ticket by its number."""
        calls.append(ticket_id)
        return f"ticket {ticket_id} is open"

    agent = build_agent(chat, [lookup_ticket], checkpointer=InMemorySaver())
    script = '{"action": "lookup_ticket", "arguments": {"ticket_id": 5}}'
    with Script(chat.engine, script) as first:
        first.ids += chat.engine.tokenizer('{"action": "reply", "text": "It is open."}')["input_ids"] + [2]
        state = agent.invoke({"messages": [HumanMessage("status of 5?")]}, {"configurable": {"thread_id": "a"}})
    kinds = [type(m) for m in state["messages"]]
    assert kinds == [HumanMessage, AIMessage, ToolMessage, AIMessage]
    assert calls == [5] and state["messages"][-1].content == "It is open."


def test_first_tool_choice_and_max_tool_rounds_shape_the_turn():
    chat = DeltaMemChat(engine=tiny_engine(), max_new_tokens=80)

    def ping(n: int) -> str:
        """Ping."""
        return "pong"

    agent = build_agent(chat, [ping], checkpointer=InMemorySaver(), max_tool_rounds=1, first_tool_choice="any")
    # the script tries to reply first and to call again later: the grammar forces a call, then a reply
    with Script(chat.engine, '{"action": "reply", "text": "no"}') as script:
        script.ids = chat.engine.tokenizer('{"action": "ping", "arguments": {"n": 1}}')["input_ids"] + [2]
        script.ids += chat.engine.tokenizer('{"action": "ping", "arguments": {"n": 2}}')["input_ids"] + [2]
        state = agent.invoke({"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "p"}})
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert state["messages"][1].tool_calls[0]["args"] == {"n": 1}
    assert state["messages"][-1].tool_calls == []  # the second call was not allowed: text only
