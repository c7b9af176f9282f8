"""The ticketing example: the database and tools (fast, scripted model) and one real run (slow)."""

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import Script, tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from examples.ticketing_bot.bot import build_bot
from examples.ticketing_bot.tickets import TicketDB, TicketError
from examples.ticketing_bot.tools import make_tools


def test_ticket_database_keeps_users_apart(tmp_path):
    db = TicketDB(tmp_path / "t.db")
    ticket = db.create("dana", "laptop", "will not boot")
    db.comment("dana", ticket["id"], "tried the power button")
    db.update_status("dana", ticket["id"], "waiting for parts")
    assert db.get("dana", ticket["id"])["status"] == "waiting for parts"
    assert db.get("dana", ticket["id"])["comments"][0]["text"] == "tried the power button"
    with pytest.raises(TicketError):
        db.get("eve", ticket["id"])
    with pytest.raises(TicketError, match="status must be one of"):
        db.update_status("dana", ticket["id"], "lost")
    db.close("dana", ticket["id"], "fixed")
    assert db.list("dana") == [] and len(db.list("dana", include_closed=True)) == 1


def test_the_bot_creates_a_ticket_through_its_tool(tmp_path):
    engine = tiny_engine()
    db = TicketDB(tmp_path / "t.db")
    bot = build_bot(DeltaMemChat(engine=engine, max_new_tokens=120), db, InMemorySaver())
    call = '{"action": "create_ticket", "arguments": {"title": "VPN drops", "description": "every hour"}}'
    with Script(engine, call) as script:
        script.ids += engine.tokenizer('{"action": "reply", "text": "Ticket opened."}')["input_ids"] + [2]
        state = bot.invoke(
            {"messages": [HumanMessage("my VPN drops every hour, open a ticket")]},
            {"configurable": {"thread_id": "support-dana", "user_id": "dana"}},
        )
    assert [t["title"] for t in db.list("dana")] == ["VPN drops"]
    assert isinstance(state["messages"][2], ToolMessage) and state["messages"][-1].content == "Ticket opened."
    listing = make_tools(db)[1]
    assert listing.name == "list_my_tickets"
    text = listing.invoke({}, {"configurable": {"user_id": "dana"}})  # plain sentences, comments included
    assert text.startswith("Your ticket 1 is open") and "Title: VPN drops" in text and "Problem: every hour" in text
    assert listing.invoke({}, {"configurable": {"user_id": "eve"}}) == "You have no open tickets."


@pytest.mark.slow
def test_embedded_backbone_makes_a_well_formed_tool_call(tmp_path):
    chat = DeltaMemChat.from_backbone(max_new_tokens=80)
    db = TicketDB(tmp_path / "t.db")
    ticket = db.create("dana", "printer", "paper jam")
    bot = build_bot(chat, db, InMemorySaver())
    state = bot.invoke(
        {"messages": [HumanMessage(f"What is the status of ticket {ticket['id']}?")]},
        {"configurable": {"thread_id": "support-dana", "user_id": "dana"}},
    )
    calls = [c for m in state["messages"] for c in getattr(m, "tool_calls", [])]
    assert calls, "the model made no tool call"
    tool_names = {t.name for t in make_tools(db)}
    assert all(c["name"] in tool_names and isinstance(c["args"], dict) for c in calls)
    assert any(isinstance(m, ToolMessage) for m in state["messages"])


def test_ticket_summaries_lead_with_the_news(tmp_path):
    db = TicketDB(tmp_path / "t.db")
    tools = {t.name: t for t in make_tools(db)}
    config = {"configurable": {"user_id": "dana", "story_day": "Monday"}}
    tools["create_ticket"].invoke({"title": "laptop", "description": "will not boot"}, config)
    commented = tools["comment_on_ticket"].invoke({"ticket_id": 1, "comment": "tried the power button"}, config)
    assert commented.startswith("Your ticket 1 is open (updated Monday). You wrote: tried the power button.\n")
    db.comment("dana", 1, "Battery ordered.", author="technician")
    looked = tools["lookup_ticket"].invoke({"ticket_id": 1}, config)
    assert looked.splitlines()[0].endswith("The technician wrote: Battery ordered.")
    assert "Earlier comment by dana: tried the power button" in looked
    closed = tools["close_ticket"].invoke({"ticket_id": 1, "resolution": "it works again"}, config)
    assert closed.startswith("Your ticket 1 is closed (updated Monday). Resolution: it works again.\n")
    assert "Earlier comment by technician: Battery ordered." in closed
