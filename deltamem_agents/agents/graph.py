"""LangGraph glue: a state schema with the memory channel, the node that updates it, and a tool-using agent.

The memory is part of the graph state, so every checkpointer (InMemorySaver, SqliteSaver, AsyncSqliteSaver,
Postgres) stores it with the messages: resume, time travel, forks and ``delete_thread`` restore or remove memory
and messages together. Only our node writes the ``memory`` channel; a bare chat model returns just a message.
"""

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from deltamem_agents.agents.chat import TURN_KWARG, DeltaMemChat, TurnIO


class DeltaMemState(TypedDict, total=False):
    """Graph state: messages (``add_messages``), the memory (safetensors bytes of a MemoryState; last value
    wins) and the watermark (ids of the messages already written into it). Subclass it to add your own keys."""

    messages: Annotated[list[AnyMessage], add_messages]
    memory: bytes | None
    written: list[str]


def memory_node(
    chat: DeltaMemChat,
    tools: list | None = None,
    max_tool_rounds: int = 3,
    system_prompt=None,
    first_tool_choice: str = "auto",
) -> RunnableLambda:
    """A node (sync and async) that runs one turn of ``chat`` on the state's messages and memory and returns
    the reply, the new memory and the new watermark. With ``tools``, tool calls are decoded under a grammar;
    after ``max_tool_rounds`` consecutive tool rounds for one user message the model must answer in text.
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

    def update(io: TurnIO, reply: AIMessage) -> dict[str, Any]:
        return {"messages": [reply], "memory": io.new_memory, "written": list(io.new_written)}

    def messages(state, config) -> list:
        text = system_prompt(config) if callable(system_prompt) else system_prompt
        present = any(isinstance(m, SystemMessage) for m in state["messages"])
        return state["messages"] if not text or present else [SystemMessage(text), *state["messages"]]

    def run(state, config):
        io = TurnIO(memory=state.get("memory"), written=tuple(state.get("written") or ()))
        return update(io, pick(state).invoke(messages(state, config), config, **{TURN_KWARG: io}))

    async def arun(state, config):
        io = TurnIO(memory=state.get("memory"), written=tuple(state.get("written") or ()))
        return update(io, await pick(state).ainvoke(messages(state, config), config, **{TURN_KWARG: io}))

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
