"""The common LangGraph / LangChain setups a DeltaMemChat is used in, each as ``turn(thread, text) -> messages``
(the conversation the setup holds after the turn, its reply last). Used by test_setups.py and setups_worker.py.

Every setup holds its messages in its own state (a checkpointer, or a chat message history file) and nothing
else: the memory comes from ``chat.store``, keyed by those messages.
"""

import json
import warnings
from pathlib import Path

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, HumanMessage, messages_from_dict, messages_to_dict
from langgraph.graph import START, MessagesState, StateGraph

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_agent, build_chatbot, memory_node

CHECKPOINTED = ["build_chatbot", "build_agent", "memory_node", "bare_model_node", "create_react_agent", "create_agent"]
SETUPS = [*CHECKPOINTED, "message_history"]
SCRIPT = ["my cat is Tom", "ticket 4411 is my laptop", "I pressed the power button", "it beeps twice", "what now?"]


class JsonFileHistory(BaseChatMessageHistory):
    """A chat message history in a JSON file per session (what a user of RunnableWithMessageHistory keeps)."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def messages(self) -> list[BaseMessage]:
        return messages_from_dict(json.loads(self.path.read_text())) if self.path.exists() else []

    def add_messages(self, messages) -> None:
        self.path.write_text(json.dumps(messages_to_dict(self.messages + list(messages))))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def graph_of(setup: str, chat: DeltaMemChat, saver):
    """The compiled graph of a checkpointed setup."""
    if setup == "build_chatbot":
        return build_chatbot(chat, checkpointer=saver)
    if setup == "build_agent":
        return build_agent(chat, [], checkpointer=saver)
    if setup in ("memory_node", "bare_model_node"):
        graph = StateGraph(MessagesState)
        if setup == "memory_node":
            graph.add_node("chat", memory_node(chat))
        else:  # the model called in a plain function node, without passing the config on
            graph.add_node("chat", lambda state: {"messages": [chat.invoke(state["messages"])]})
        graph.add_edge(START, "chat")
        return graph.compile(checkpointer=saver)
    if setup == "create_react_agent":
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of create_agent, still widely used
            return create_react_agent(chat, [], checkpointer=saver)
    if setup == "create_agent":
        from langchain.agents import create_agent

        from deltamem_agents.agents.middleware import DeltaMemMiddleware

        return create_agent(chat, [], middleware=[DeltaMemMiddleware()], checkpointer=saver)
    raise ValueError(f"not a checkpointed setup: {setup}")


def turn_runner(setup: str, chat: DeltaMemChat, saver=None, histories: Path | None = None):
    """``turn(thread, text) -> messages`` for ``setup``: the graph's checkpointed messages after the turn, or
    (``message_history``) the session's history after it."""
    if setup == "message_history":
        from langchain_core.runnables.history import RunnableWithMessageHistory

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of LangGraph persistence, still widely used
            with_history = RunnableWithMessageHistory(
                chat, lambda session: JsonFileHistory(histories / f"{session}.json")
            )

        def turn(thread: str, text: str) -> list[BaseMessage]:
            with_history.invoke([HumanMessage(text)], {"configurable": {"session_id": thread}})
            return JsonFileHistory(histories / f"{thread}.json").messages

        return turn
    graph = graph_of(setup, chat, saver)

    def turn(thread: str, text: str) -> list[BaseMessage]:
        return graph.invoke({"messages": [HumanMessage(text)]}, {"configurable": {"thread_id": thread}})["messages"]

    return turn
