"""langchain's create_agent (with or without DeltaMemMiddleware) reads the memory of exactly the messages of each
checkpoint, and gives the same memory bytes as the library's own graph for the same conversation."""

import pytest
from graph_worker import fresh
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine

from deltamem_agents import MemoryState
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot, forget_thread
from deltamem_agents.agents.middleware import DeltaMemMiddleware
from deltamem_agents.core.errors import DeltaMemError

SCRIPT = ["my cat is Tom", "ticket 4411 is my laptop", "I pressed the power button", "what did I try?"]


@pytest.fixture(scope="module")
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=5, window_messages=2)


def run_script(graph, thread: str):
    config = {"configurable": {"thread_id": thread}}
    states = [graph.invoke({"messages": [HumanMessage(text)]}, config) for text in SCRIPT]
    return states, config


def test_create_agent_memory_equals_the_librarys_own_graph(chat):
    agent_chat, our_chat = fresh(chat), fresh(chat)  # separate stores: each computes its own states
    agent = create_agent(agent_chat, [], middleware=[DeltaMemMiddleware()], checkpointer=InMemorySaver())
    ours = build_chatbot(our_chat, checkpointer=InMemorySaver())
    agent_states, _ = run_script(agent, "a")
    our_states, _ = run_script(ours, "b")
    for theirs, mine in zip(agent_states, our_states):
        assert [m.text for m in theirs["messages"]] == [m.text for m in mine["messages"]]
        assert agent_chat.stored_memory(theirs["messages"]) == our_chat.stored_memory(mine["messages"])  # bytes
        assert "memory" not in theirs and "written" not in theirs  # nothing of the memory in the agent state
    assert not MemoryState.from_bytes(agent_chat.stored_memory(agent_states[-1]["messages"])).is_zero()
    assert agent_chat.store.owners() == ["a"] and len(agent_chat.store.keys_of("a")) == 3


def test_create_agent_time_travel_fork_and_forget_restore_the_memory_of_that_point(chat):
    chat = fresh(chat)
    saver = InMemorySaver()
    agent = create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=saver)
    states, config = run_script(agent, "t")
    memories = [chat.stored_memory(s["messages"]) for s in states]
    history = list(agent.get_state_history(config))
    after_two = next(s for s in history if len(s.values.get("messages", [])) == 4)
    assert chat.stored_memory(after_two.values["messages"]) == memories[1]
    forked = agent.invoke({"messages": [HumanMessage("something else")]}, after_two.config)
    fork_memory = chat.stored_memory(forked["messages"])
    assert forked["messages"][-1].response_metadata["memory_tokens_written"] == 0  # stored by the old turn 3
    assert fork_memory == memories[2]  # the same written messages (turns 1-2): the same memory
    assert fork_memory != memories[3]  # not the abandoned branch's turn 3
    original_head = agent.get_state(history[0].config).values  # the original branch's last checkpoint
    assert chat.stored_memory(original_head["messages"]) == memories[-1]  # untouched by the fork
    assert forget_thread(saver, chat, "t") == 3 and len(chat.store) == 0


async def test_create_agent_async_keeps_the_memory(chat):
    chat = fresh(chat)
    agent = create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "async"}}
    for text in SCRIPT[:3]:
        state = await agent.ainvoke({"messages": [HumanMessage(text)]}, config)
    assert chat.store.owners() == ["async"]
    reference = fresh(chat).memory_of(state["messages"]).to_bytes()
    assert chat.stored_memory(state["messages"]) == reference and not MemoryState.from_bytes(reference).is_zero()


def test_the_middleware_refuses_another_model():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    agent = create_agent(FakeListChatModel(responses=["hi"]), [], middleware=[DeltaMemMiddleware()])
    with pytest.raises(DeltaMemError, match="needs a DeltaMemChat"):
        agent.invoke({"messages": [HumanMessage("hello")]})
