"""Replies that stop after a number of sentences (``serving.sentence_limit``, ``DeltaMemChat.reply_sentences``)."""

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from tiny_chat import Script, VocabTokens, tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.serving.sentence_limit import count_sentences


def lookup_ticket(ticket_id: int) -> str:
    """Look up a ticket."""
    return "ok"


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("Your ticket 1 is open (updated Monday).", 1),
        ("Hi. How", 1),
        ("Wow!! Really? Yes", 2),
        ('He said "ok." Then', 1),
        ("Total 7.50. Then more", 0),  # a full stop after a digit may be a decimal point: never counted
        ("v1.2 is out", 0),
        ("one\ntwo", 1),
        ("one\\ntwo", 1),  # a line break inside a JSON string
        ("no end yet", 0),
    ],
)
def test_count_sentences(text, sentences):
    assert count_sentences(text) == sentences


def test_a_reply_stops_after_its_sentence_limit(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=80, repetition=None)
    with Script(engine, "Fine. Thanks for asking! More text here."):
        assert chat.invoke([HumanMessage("hi")]).content == "Fine. Thanks for asking! More text here."
    limited = chat.model_copy(update={"reply_sentences": 2})
    with Script(engine, "Fine. Thanks for asking! More text here."):
        assert limited.invoke([HumanMessage("hi")]).content == "Fine. Thanks for asking!"


def test_the_limit_cuts_an_enveloped_reply_but_never_a_tool_call(engine):
    call = {"name": "lookup_ticket", "args": {"ticket_id": 4}, "id": "c1", "type": "tool_call"}
    history = [HumanMessage("ticket 4?"), AIMessage("", tool_calls=[call]), ToolMessage("open.", tool_call_id="c1")]
    chat = DeltaMemChat(engine=engine, max_new_tokens=80, repetition=None, reply_sentences=1)
    bound = chat.bind_tools([lookup_ticket], tool_choice="none")  # the prompt shows a call: the envelope is used
    with Script(engine, '{"action": "reply", "text": "It is open. It was opened on Monday."}'):
        assert bound.invoke(history).content == "It is open."
    calling = chat.bind_tools([lookup_ticket], tool_choice="any")
    with Script(engine, '{"action": "lookup_ticket", "arguments": {"ticket_id": 4}}'):
        assert calling.invoke([HumanMessage("Ticket 4. Please. Now.")]).tool_calls[0]["args"] == {"ticket_id": 4}


def test_an_enveloped_reply_closes_only_after_a_finished_sentence():
    import torch

    from deltamem_agents.serving.sentence_limit import CloseAtSentenceEnd

    tokenizer = VocabTokens(['{"text": "', "Event 3 ", '"', '",', "budget", ".", " ok"])

    def allowed_after(tokens):
        state = CloseAtSentenceEnd(tokenizer, after='{"text": "').start()
        produced = []
        for token in tokens:
            produced.append(token)
            state.observe(token, produced, tokenizer.decode(produced))
        logits = torch.zeros(len(tokenizer))
        state.adjust(logits)
        return set(torch.isfinite(logits).nonzero().flatten().tolist())

    everything = set(range(len(tokenizer.vocab)))
    quotes = {0, 2, 3}  # every token with an unescaped quote
    assert allowed_after([]) == everything  # before the reply head: nothing is touched
    assert allowed_after([0]) == everything - quotes  # an empty reply may not close
    assert allowed_after([0, 1]) == everything - quotes  # "Event 3 " is mid-sentence: the quote is refused
    assert allowed_after([0, 1, 4, 5]) == everything  # "Event 3 budget." has ended: it may close
    assert allowed_after([0, 1, 4, 5, 6]) == everything - quotes


def test_the_limit_lets_a_closed_envelope_finish():
    from deltamem_agents.serving.sentence_limit import SentenceLimit

    state = SentenceLimit(1, after='"text": "').start()
    assert not state.observe(0, [0], '{"text": "Done so')
    assert state.observe(0, [0], '{"text": "Done. So')  # one sentence: stop
    closed = SentenceLimit(1, after='"text": "').start()
    assert not closed.observe(0, [0], '{"text": "Done."')  # the string is closed: the grammar adds the brace


def test_a_long_sentence_ends_at_its_next_clause_break(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=80, repetition=None, reply_sentence_words=2)
    with Script(engine, "ab, cd ef, gh ij, kl."):
        assert chat.invoke([HumanMessage("hi")]).content == "ab, cd ef. gh ij. kl."
    one = chat.model_copy(update={"reply_sentences": 1})
    with Script(engine, "ab, cd ef, gh ij, kl."):
        assert one.invoke([HumanMessage("hi")]).content == "ab, cd ef."
    unlimited = chat.model_copy(update={"reply_sentence_words": None})
    with Script(engine, "ab, cd ef, gh ij, kl."):
        assert unlimited.invoke([HumanMessage("hi")]).content == "ab, cd ef, gh ij, kl."


def test_the_clause_break_moves_the_comma_score_to_the_full_stop():
    import torch

    from deltamem_agents.serving.sentence_limit import SentenceLimit, open_sentence_words

    tokenizer = VocabTokens(["one", " two", ",", " ,", ";", ".", " three", "!"])
    assert open_sentence_words("Done. one two") == 2
    assert open_sentence_words("one two.") == 0

    def adjusted(text, logits):
        state = SentenceLimit(None, sentence_words=2, tokenizer=tokenizer).start()
        state.observe(0, [0], text)
        logits = torch.tensor(logits)
        state.adjust(logits)
        return logits.tolist()

    scores = [0.0, 1.0, 5.0, 4.0, 3.0, 2.0, 0.5, 0.0]
    assert adjusted("one", scores) == scores  # a short sentence keeps its commas
    inf = float("-inf")
    assert adjusted("one two", scores) == [0.0, 1.0, inf, inf, inf, 5.0, 0.5, 0.0]
    assert adjusted("one two", [9.0, 1.0, 5.0, 4.0, 3.0, 6.0, 0.5, 0.0])[5] == 6.0  # a stronger stop stays
    with pytest.raises(ValueError, match="tokenizer"):
        SentenceLimit(2, sentence_words=3)
