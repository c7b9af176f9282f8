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
