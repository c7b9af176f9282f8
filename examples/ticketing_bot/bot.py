"""The support agent: DeltaMemChat + the ticket tools in a LangGraph agent, one thread (and memory) per user."""

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_agent
from examples.ticketing_bot.tickets import TicketDB
from examples.ticketing_bot.tools import make_tools

SYSTEM_PROMPT = (
    "You are the IT support assistant of Acme Corp. You help {user} with their tickets. "
    "Use a tool whenever the user asks to open, check, update, comment on or close a ticket. "
    "Keep answers short. Today is {day}."
)


def system_prompt(config) -> str:
    settings = config["configurable"]
    return SYSTEM_PROMPT.format(user=settings["user_id"], day=settings.get("story_day", "today"))


def build_bot(chat: DeltaMemChat, db: TicketDB, checkpointer):
    """The compiled agent graph. Invoke it with config ``{"configurable": {"thread_id", "user_id"}}``."""
    # The 135M backbone answers in text far too often under tool_choice="auto" and picks among six tools little
    # better than chance (docs/tool-choice.md), so the first model call of every user turn must call one of the
    # two tools that best match the request (tool_preselect=2), and after one tool round it must answer.
    chat = chat.model_copy(update={"tool_preselect": chat.tool_preselect or 2})
    return build_agent(
        chat,
        make_tools(db),
        checkpointer=checkpointer,
        system_prompt=system_prompt,
        max_tool_rounds=1,
        first_tool_choice="any",
    )
