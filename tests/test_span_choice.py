"""Span choice by likelihood (``serving.span_choice``), on the tiny random backbone: the fast scores equal the naive
ones, the chosen span is the best one and is what the call contains."""

import pytest
import torch
from langchain_core.messages import HumanMessage
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.serving.span_choice import ScoredSpan, best_span, span_bounds, span_scores, span_scores_naive


def create_ticket(title: str) -> str:
    """Open a ticket."""
    return "ok"


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def test_span_bounds_are_word_aligned_bounded_and_need_no_escape():
    source = 'Hi, my laptop "X1" broke. Fix it now'
    bounds = span_bounds(source, max_words=3)
    spans = {source[s:e] for s, ends in bounds.items() for e in ends}
    assert {"Hi", "Hi, my", "Hi, my laptop", "broke.", "X1", 'X1" broke'} - spans == {'X1" broke'}
    assert "Hi, my laptop X1" not in spans and all('"' not in s for s in spans)  # 3 words at most, no quote
    assert "lap" not in spans and "my lapt" not in spans  # never inside a word
    assert "broke. Fix" in spans and "Fix it now" in spans and "it now" in spans


def test_fast_span_scores_match_the_naive_reference(engine):
    prefix = engine.render_prompt([{"role": "user", "content": "open a ticket: printer jams on page two."}])
    source = "printer jams on page two."
    fast = {(s.start, s.end): s for s in span_scores(engine, None, prefix, source, max_words=4)}
    naive = {(s.start, s.end): s for s in span_scores_naive(engine, None, prefix, source, max_words=4)}
    assert len(fast) >= 10 and set(fast) <= set(naive)
    for key, span in fast.items():
        assert span.token_ids == naive[key].token_ids
        assert span.logprob == pytest.approx(naive[key].logprob, abs=1e-3)
        assert span.close_logprob == pytest.approx(naive[key].close_logprob, abs=1e-3)


def test_the_length_power_trades_short_spans_against_long_ones():
    short = ScoredSpan(0, 6, (1,), -2.0, -1.0)  # sum -3 over 2
    long = ScoredSpan(0, 30, (1, 2, 3, 4, 5), -5.0, -0.4)  # sum -5.4 over 6
    assert best_span([short, long], 0.0) is short  # the plain sum prefers the short span
    assert best_span([short, long], 1.0) is long  # the mean per token prefers the long one
    assert best_span([], 0.5) is None


def test_the_call_contains_the_best_scored_span(engine, monkeypatch):
    import deltamem_agents.agents.chat as chat_module

    chosen = []
    real = chat_module.best_span
    monkeypatch.setattr(chat_module, "best_span", lambda spans, p: chosen.append(real(spans, p)) or chosen[-1])
    chat = DeltaMemChat(engine=engine, max_new_tokens=120, span_arguments="strings", span_scoring="likelihood")
    request = "my laptop is broken since monday"
    reply = chat.bind_tools([create_ticket], tool_choice="any").invoke([HumanMessage(request)])
    assert len(chosen) == 1
    span = chosen[0]
    assert reply.tool_calls[0]["args"] == {"title": request[span.start : span.end]}
    assert engine.tokenizer.decode(list(span.token_ids)) == request[span.start : span.end]


def test_span_choice_gives_the_value_back_when_the_grammar_refuses_a_token():
    from deltamem_agents.serving.span_choice import SpanChoice

    class Tokens:
        vocab = ['{"', "title", '":', ' "', "Fix", " it", '"', "x"]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    tokenizer = Tokens()
    state = SpanChoice(frozenset({"title"}), tokenizer, lambda produced: (4, 5)).start()
    produced = []
    for token in (0, 1, 2, 3):  # {"title": "
        logits = torch.zeros(len(tokenizer))
        state.adjust(logits)
        produced.append(token)
        state.observe(token, produced, tokenizer.decode(produced))
    closers = {2, 6}  # every token that starts with a quote (the grammar picks the valid one)
    for expected in ({4}, {5}, closers):  # "Fix", " it", then only a closing quote
        logits = torch.zeros(len(tokenizer))
        state.adjust(logits)
        assert set(torch.isfinite(logits).nonzero().flatten().tolist()) == expected
        expected = max(expected)
        produced.append(expected)
        state.observe(expected, produced, tokenizer.decode(produced))
    logits = torch.zeros(len(tokenizer))
    state.adjust(logits)
    assert torch.isfinite(logits).all()  # the value is closed: nothing is forced any more
    refused = SpanChoice(frozenset({"title"}), tokenizer, lambda produced: (4, 5)).start()
    produced = []
    for token in (0, 1, 2, 3, 7):  # the grammar took "x" instead of "Fix"
        produced.append(token)
        refused.observe(token, produced, tokenizer.decode(produced))
    logits = torch.zeros(len(tokenizer))
    refused.adjust(logits)
    assert torch.isfinite(logits).all()
