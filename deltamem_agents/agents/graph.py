"""LangGraph glue: the node that runs a turn of the chat model, a tool-using agent, a chatbot, and forgetting.

The memory is not part of the graph state: ``DeltaMemChat`` finds it from the messages the state holds (a
content-addressed store, ``deltamem_agents.agents.store``), so every checkpointer (InMemorySaver, SqliteSaver,
Postgres, ...) and every graph whose state holds the messages (``MessagesState``, ``create_react_agent``,
``create_agent``) gets the memory of exactly the messages of the checkpoint it runs from: resume in another
process, time travel and forks need nothing more. To delete a thread, use :func:`forget_thread`, which deletes
its checkpoints and its memory states.
"""

from typing import Annotated, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from deltamem_agents.agents.chat import DeltaMemChat


class DeltaMemState(TypedDict, total=False):
    """Graph state: the messages (``add_messages``), as ``MessagesState``; subclass it to add your own keys.
    The memory lives in the chat model's store, keyed by these messages, not in the state."""

    messages: Annotated[list[AnyMessage], add_messages]


def forget_thread(checkpointer, chat: DeltaMemChat, thread_id: str) -> int:
    """Delete a thread everywhere: its checkpoints (``checkpointer.delete_thread``) and every memory state in
    ``chat.store`` that only it used (``chat.forget``); returns how many states were removed."""
    checkpointer.delete_thread(thread_id)
    return chat.forget(thread_id)


async def aforget_thread(checkpointer, chat: DeltaMemChat, thread_id: str) -> int:
    """:func:`forget_thread` for async checkpointers (``adelete_thread``)."""
    await checkpointer.adelete_thread(thread_id)
    return chat.forget(thread_id)


def memory_node(
    chat: DeltaMemChat,
    tools: list | None = None,
    max_tool_rounds: int = 3,
    system_prompt=None,
    first_tool_choice: str = "auto",
) -> RunnableLambda:
    """A node (sync and async) that runs one turn of ``chat`` on the state's messages (their memory comes from
    ``chat.store``) and returns the reply; it works in any state schema with a ``messages`` channel. With
    ``tools``, tool calls are decoded under a grammar; after ``max_tool_rounds`` consecutive tool rounds for one
    user message the model must answer in text.
    ``system_prompt`` (a string, or a function of the run config returning one) is put in front of the
    messages when they hold no system message; it is not added to the state. ``first_tool_choice`` is the
    tool_choice of the first model call after a user message ("auto", or "any" for agents where every request
    needs a tool first — small models choose "reply" too often under "auto"); later calls use "auto"."""
    first = chat.bind_tools(tools, tool_choice=first_tool_choice) if tools else chat
    with_tools = chat.bind_tools(tools) if tools else chat
    text_only = chat.bind_tools(tools, tool_choice="none") if tools else chat

    def pick(state):
        rounds = _tool_rounds_since_user(state["messages"])
        if rounds >= max_tool_rounds:
            return text_only
        return first if rounds == 0 else with_tools

    def messages(state, config) -> list:
        text = system_prompt(config) if callable(system_prompt) else system_prompt
        present = any(isinstance(m, SystemMessage) for m in state["messages"])
        return state["messages"] if not text or present else [SystemMessage(text), *state["messages"]]

    def run(state, config):
        return {"messages": [pick(state).invoke(messages(state, config), config)]}

    async def arun(state, config):
        return {"messages": [await pick(state).ainvoke(messages(state, config), config)]}

    return RunnableLambda(run, afunc=arun, name="deltamem_chat")


def route_tools(state) -> str:
    """Conditional edge: to ``tools`` when the last message asks for tool calls, else to the end."""
    last = state["messages"][-1]
    return "tools" if isinstance(last, AIMessage) and last.tool_calls else END


def build_agent(
    chat: DeltaMemChat,
    tools: list,
    checkpointer=None,
    state_schema=DeltaMemState,
    system_prompt=None,
    max_tool_rounds: int = 3,
    first_tool_choice: str = "auto",
    **compile_kwargs,
):
    """A ready tool-using agent: ``agent`` (our memory node) <-> ``tools`` (LangGraph's ToolNode), with a
    conditional edge that ends the turn when the model answers in text."""
    graph = StateGraph(state_schema)
    node = memory_node(chat, tools, max_tool_rounds, system_prompt, first_tool_choice)
    graph.add_node("agent", node)
    graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route_tools, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=checkpointer, **compile_kwargs)


def build_chatbot(
    chat: DeltaMemChat, checkpointer=None, state_schema=DeltaMemState, system_prompt=None, **compile_kwargs
):
    """The simplest graph: one memory node."""
    graph = StateGraph(state_schema)
    graph.add_node("chat", memory_node(chat, system_prompt=system_prompt))
    graph.add_edge(START, "chat")
    graph.add_edge("chat", END)
    return graph.compile(checkpointer=checkpointer, **compile_kwargs)


def _tool_rounds_since_user(messages: list) -> int:
    rounds = 0
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            break
        if isinstance(message, AIMessage) and message.tool_calls:
            rounds += 1
    return rounds
