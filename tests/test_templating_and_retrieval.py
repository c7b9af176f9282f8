"""Chat rendering with message boundaries, and BM25 notes from the same thread under a token cap."""

import pytest
from tiny_chat import char_level_tokenizer

from deltamem_agents.serving.retrieval import retrieve_notes, words
from deltamem_agents.serving.templating import render_chat

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe nice.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return char_level_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!'", CHATML)


def test_every_token_belongs_to_its_message(tokenizer):
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]
    rendered = render_chat(tokenizer, messages, add_generation_prompt=True)
    text = lambda ids: tokenizer.decode(ids.tolist())  # noqa: E731
    assert "Be nice." in text(rendered.input_ids[rendered.message_index == -1])
    assert text(rendered.input_ids[rendered.message_index == 0]) == "<|im_start|>user\nhi there<|im_end|>\n"
    assert text(rendered.input_ids[rendered.message_index == 1]) == "<|im_start|>assistant\nyo<|im_end|>\n"
    assert rendered.message_index[-3:].tolist() == [-1, -1, -1]  # the generation prompt is no message
    assert tokenizer.decode(rendered.input_ids.tolist()) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_system_messages_are_not_segments(tokenizer):
    messages = [{"role": "system", "content": "rules"}, {"role": "user", "content": "q"}]
    rendered = render_chat(tokenizer, messages)
    segments = rendered.segment_ids()
    assert set(segments.tolist()) == {-1, 1}
    assert (rendered.message_index == 0).sum() > 0


def test_notes_match_the_query_within_the_cap():
    history = [
        ("user", "My order number is 4417 and the blender arrived cracked."),
        ("assistant", "Sorry! Noted."),
        ("user", "The weather is lovely today."),
        ("user", "Send the replacement blender to Pine Street please."),
    ]
    count = lambda text: len(text.split())  # noqa: E731
    notes = retrieve_notes(history, "where does the blender go", count, max_tokens=100)
    assert [n.position for n in notes] == [0, 3]  # conversation order, only matching messages
    capped = retrieve_notes(history, "blender order 4417", count, max_tokens=5)
    assert sum(count(n.text) for n in capped) <= 5 and capped[0].position == 0
    assert retrieve_notes(history, "the and of", count) == []
    assert words("The Blender, 4417!") == ["blender", "4417"]


def test_notes_hold_what_the_user_said_and_the_window_starts_with_a_user_message():
    from deltamem_agents.serving.turn_plan import WindowPolicy, plan_chat_turn

    chat = [
        {"role": "user", "content": "my blender arrived cracked"},
        {"role": "assistant", "content": "the blender is cracked, the blender is cracked"},
        {"role": "tool", "content": "order 4417: blender, shipped"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "what about the blender?"},
    ]
    ids = [str(i) for i in range(len(chat))]
    count = lambda text: len(text.split())  # noqa: E731
    default = plan_chat_turn(chat, ids, (), WindowPolicy(messages=2), count)
    assert default.notes == ["user: my blender arrived cracked"]  # not the assistant's reply, not the old result
    every = WindowPolicy(messages=2, note_roles=("user", "assistant", "tool"), start_on_user=False)
    free = plan_chat_turn(chat, ids, (), every, count)
    assert "assistant: the blender is cracked, the blender is cracked" in free.notes
    assert "tool: order 4417: blender, shipped" in free.notes
    assert len(default.to_write) == len(free.to_write) == 5  # the memory still gets every older message
    assert [m["content"] for m in free.prompt[1:]] == ["fine", "what about the blender?"]
    assert [m["content"] for m in default.prompt[1:]] == ["what about the blender?"]  # "fine" lost its request
    wider = plan_chat_turn(chat, ids, (), WindowPolicy(messages=3), count)
    assert [m["content"] for m in wider.prompt[1:]] == ["ok", "fine", "what about the blender?"]


def test_reply_only_instructions_are_empty():
    from deltamem_agents.serving.tool_grammar import instructions, tool_specs

    assert instructions([], True) == ""  # a reply alone: the grammar writes its envelope, nothing to explain
    with_tool = instructions(tool_specs([{"name": "lookup", "description": "find it"}]), True)
    assert "- lookup(): find it" in with_tool and "To call a tool" in with_tool


def test_instructions_show_each_arguments_description_from_the_docstring():
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from deltamem_agents.serving.tool_grammar import instructions, tool_specs

    @tool(parse_docstring=True)
    def open_case(title: str, level: int) -> str:
        """Open a case.

        Args:
            title: a few words that name the problem.
            level: how urgent it is.
        """
        return "ok"

    text = instructions(tool_specs([convert_to_openai_tool(open_case)]), False)
    assert "- open_case(title: string (a few words that name the problem), level: integer (how urgent it is))" in text
    plain = instructions(tool_specs([{"name": "lookup", "parameters": {"properties": {"n": {"type": "integer"}}}}]), 0)
    assert "- lookup(n: integer)" in plain  # no description: the name and type alone, as before
