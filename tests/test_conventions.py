"""LangChain's argument conventions on DeltaMemChat: max_tokens, model, unknown arguments, content blocks,
structured output on cut-off, integer bounds in the grammar, tool_choice forms (tiny backbone)."""

import json

import pytest
import xgrammar as xgr
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, ValidationError
from tiny_chat import Script, tiny_engine
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

from deltamem_agents.agents.chat import DeltaMemChat, StructuredOutputError
from deltamem_agents.agents.turn import MessageError
from deltamem_agents.core.errors import ConfigError
from deltamem_agents.serving.tool_grammar import MAX_INTEGER, envelope_schema, tool_specs


def lookup_ticket(ticket_id: int) -> str:
    """Look up a support ticket by its number."""
    return f"ticket {ticket_id}: open"


def close_ticket(ticket_id: int, reason: str) -> str:
    """Close a ticket."""
    return "closed"


class Ticket(BaseModel):
    title: str
    priority: int


@pytest.fixture
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=12, repetition=None)


def test_max_tokens_is_the_langchain_spelling_of_max_new_tokens(chat):
    with Script(chat.engine, "a long scripted answer"):
        reply = chat.invoke("hello", max_tokens=3)
    assert reply.usage_metadata["output_tokens"] == 3 and reply.response_metadata["finish_reason"] == "length"
    with Script(chat.engine, "a long scripted answer"):
        assert chat.bind(max_tokens=2).invoke("hello").usage_metadata["output_tokens"] == 2
    built = DeltaMemChat(engine=chat.engine, max_tokens=4)
    assert built.max_new_tokens == 4
    with pytest.raises(ConfigError, match="disagree"):
        chat.invoke("hello", max_tokens=3, max_new_tokens=5)
    with pytest.raises(ConfigError, match="positive integer"):
        chat.invoke("hello", max_tokens=0)


def test_model_must_name_the_served_model_and_a_refused_call_touches_no_memory(chat):
    config = {"configurable": {"thread_id": "m"}}
    chat.invoke("hello", config, model=chat.model_name, max_tokens=1)
    history = [HumanMessage("hi", id="1"), HumanMessage("again", id="2")]
    with pytest.raises(ConfigError, match="cannot switch to model='gpt-4o'"):
        chat.invoke(history, config, model="gpt-4o")
    assert chat.stored_memory(history) is None  # the refused turn wrote nothing
    chat.invoke(history, config, max_tokens=1)
    assert chat.stored_memory(history) is not None  # the same turn, accepted, stores its memory


def test_unknown_arguments_are_refused_with_what_is_accepted(chat):
    with pytest.raises(ConfigError, match=r"unknown call arguments \['temprature'\].*accepted"):
        chat.invoke("hello", temprature=0.5)
    with pytest.raises(ConfigError, match="unknown call arguments"):
        chat.bind(frequency_penalty=1.0).invoke("hello")
    with pytest.raises(ConfigError, match="with_structured_output"):
        chat.invoke("hello", response_format={"type": "json_object"})
    with pytest.raises(ConfigError, match="unknown call arguments"):
        chat.bind_tools([lookup_ticket], top_k=3)
    with pytest.raises(ValidationError, match="max_tokn"):
        DeltaMemChat(engine=chat.engine, max_tokn=5)


def test_text_blocks_are_read_and_other_blocks_refused(chat):
    text_blocks = HumanMessage(content=[{"type": "text", "text": "hello "}, "there"])
    assert chat.invoke([text_blocks], max_tokens=2).content is not None
    image = HumanMessage(
        content=[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    )
    with pytest.raises(MessageError, match="'image_url' content block.*text only"):
        chat.invoke([image])


def test_structured_output_complete(chat):
    chat = DeltaMemChat(engine=chat.engine, max_tokens=80)
    with Script(chat.engine, '{"action": "Ticket", "arguments": {"title": "printer", "priority": 2}}'):
        raw = chat.with_structured_output(Ticket, include_raw=True).invoke("printer, priority 2")
    assert raw["parsed"] == Ticket(title="printer", priority=2) and raw["parsing_error"] is None
    assert raw["raw"].tool_calls[0]["name"] == "Ticket"


def test_structured_output_cut_off_raises_or_reports_it(chat):
    script = '{"action": "Ticket", "arguments": {"title": "printer", "priority": 2}}'
    with Script(chat.engine, script), pytest.raises(StructuredOutputError, match="cut off after 8 tokens"):
        chat.with_structured_output(Ticket).invoke("printer", max_tokens=8)
    with Script(chat.engine, script):
        raw = chat.bind(max_tokens=8).with_structured_output(Ticket, include_raw=True).invoke("printer")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], StructuredOutputError)
    assert raw["raw"].response_metadata["finish_reason"] == "length"
    with Script(chat.engine, script):
        assert chat.with_structured_output(Ticket, on_cutoff="none").invoke("printer", max_tokens=8) is None
    with pytest.raises(ConfigError, match="on_cutoff"):
        chat.with_structured_output(Ticket, on_cutoff="ignore")


def test_integers_in_tool_arguments_have_at_most_twelve_digits():
    from langchain_core.utils.function_calling import convert_to_openai_tool

    schema = envelope_schema(tool_specs([convert_to_openai_tool(lookup_ticket)]), allow_reply=False)
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)

    def call(ticket_id: str) -> str:
        return '{"action": "lookup_ticket", "arguments": {"ticket_id": ' + ticket_id + "}}"

    assert MAX_INTEGER == 999_999_999_999
    assert grammar_accepts(grammar, call("7")) and grammar_accepts(grammar, call("-42"))
    assert grammar_accepts(grammar, call("9" * 12))
    assert not grammar_accepts(grammar, call("1" + "0" * 12))


def test_tool_choice_dicts_name_one_tool(chat):
    anthropic_form = {"type": "tool", "name": "close_ticket"}
    openai_form = {"type": "function", "function": {"name": "close_ticket"}}
    for choice in (anthropic_form, openai_form):
        bound = chat.bind_tools([lookup_ticket, close_ticket], tool_choice=choice)
        # the model is scripted to call the other tool: the grammar holds it to the chosen one
        with Script(chat.engine, '{"action": "lookup_ticket", "arguments": {"ticket_id": 7}}'):
            reply = bound.invoke("close 7", max_tokens=30)  # cut off in the arguments: returned as text
        assert reply.content.startswith('{"action": "close_ticket"')
    bound = chat.bind_tools([lookup_ticket], tool_choice={"type": "any"})
    with Script(chat.engine, '{"action": "reply", "text": "hi"}'):  # a reply is not allowed under "any"
        assert bound.invoke("hi", max_tokens=30).content.startswith('{"action": "lookup_ticket"')


def test_bad_tool_choices_say_what_is_wrong(chat):
    with pytest.raises(ConfigError, match="names 'delete_ticket', which is not a bound tool"):
        chat.bind_tools([lookup_ticket], tool_choice={"type": "tool", "name": "delete_ticket"})
    with pytest.raises(ConfigError, match="needs at least one bound tool"):
        chat.bind_tools([], tool_choice="any")
    with pytest.raises(ConfigError, match="names no tool"):
        chat.bind_tools([lookup_ticket], tool_choice={"type": "tool"})
    with pytest.raises(ConfigError, match="not understood"):
        chat.bind_tools([lookup_ticket], tool_choice=3)
