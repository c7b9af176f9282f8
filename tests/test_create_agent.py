"""langchain's create_agent with DeltaMemMiddleware keeps the memory in the agent state, in step with the
messages, and gives the same memory bytes as the library's own graph for the same conversation."""

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine

from deltamem_agents import MemoryState
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot
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
    agent = create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=InMemorySaver())
    ours = build_chatbot(chat, checkpointer=InMemorySaver())
    agent_states, _ = run_script(agent, "a")
    our_states, _ = run_script(ours, "b")
    for theirs, mine in zip(agent_states, our_states):
        assert [m.text for m in theirs["messages"]] == [m.text for m in mine["messages"]]
        assert theirs["memory"] == mine["memory"]  # byte for byte
    assert not MemoryState.from_bytes(agent_states[-1]["memory"]).is_zero()
    assert len(agent_states[-1]["written"]) == 6


def test_create_agent_time_travel_and_fork_restore_the_memory_of_that_point(chat):
    agent = create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=InMemorySaver())
    states, config = run_script(agent, "t")
    history = list(agent.get_state_history(config))
    after_two = next(s for s in history if len(s.values.get("messages", [])) == 4)
    assert after_two.values["memory"] == states[1]["memory"]
    forked = agent.invoke({"messages": [HumanMessage("something else")]}, after_two.config)
    assert len(forked["written"]) == 4  # the fork writes turns 1-2 only, not the abandoned branch
    assert forked["memory"] == states[2]["memory"]  # the same written messages: the same memory
    assert forked["memory"] != states[3]["memory"]  # not the abandoned branch's turn 3
    original_head = agent.get_state(history[0].config).values  # the original branch's last checkpoint
    assert original_head["memory"] == states[-1]["memory"]  # untouched by the fork


async def test_create_agent_async_keeps_the_memory(chat):
    agent = create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "async"}}
    for text in SCRIPT[:3]:
        state = await agent.ainvoke({"messages": [HumanMessage(text)]}, config)
    assert len(state["written"]) == 4 and not MemoryState.from_bytes(state["memory"]).is_zero()


def test_the_middleware_refuses_another_model():
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    agent = create_agent(FakeListChatModel(responses=["hi"]), [], middleware=[DeltaMemMiddleware()])
    with pytest.raises(DeltaMemError, match="needs a DeltaMemChat"):
        agent.invoke({"messages": [HumanMessage("hello")]})
