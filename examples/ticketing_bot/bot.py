"""The support agent: DeltaMemChat + the ticket tools in a LangGraph agent, one thread (and memory) per user."""

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_agent
from examples.ticketing_bot.tickets import TicketDB
from examples.ticketing_bot.tools import make_tools, span_arguments, value_providers

SYSTEM_PROMPT = (
    "You are the IT support assistant of Acme Corp. You help {user} with their tickets. "
    "Use a tool whenever the user asks to open, check, update, comment on or close a ticket. "
    "When a tool has answered, tell the user what it says in your own words. Keep answers short. Today is {day}."
)


def system_prompt(config) -> str:
    settings = config["configurable"]
    return SYSTEM_PROMPT.format(user=settings["user_id"], day=settings.get("story_day", "today"))


def build_bot(chat: DeltaMemChat, db: TicketDB, checkpointer):
    """The compiled agent graph. Invoke it with config ``{"configurable": {"thread_id", "user_id"}}``."""
    # Every model call runs under tool_choice="auto": the model decides between replying and each tool
    # (DeltaMemChat's likelihood tool choice on the embedded backbone, docs/tool-choice.md). Ticket ids are
    # grounded in the user's tickets (value_providers), free-text arguments are spans of the user's message
    # (span_arguments), and after one tool round the model answers in text.
    spans = chat.span_arguments if chat.span_arguments == "strings" else {**span_arguments(), **chat.span_arguments}
    chat = chat.model_copy(
        update={"value_providers": {**value_providers(db), **chat.value_providers}, "span_arguments": spans}
    )
    return build_agent(
        chat,
        make_tools(db),
        checkpointer=checkpointer,
        system_prompt=system_prompt,
        max_tool_rounds=1,
        first_tool_choice="auto",
    )
