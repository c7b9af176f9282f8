"""Likelihood tool choice, grounded arguments and repetition control (issue 12), on the tiny random backbone."""

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from tiny_chat import Script, VocabTokens, tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.core.errors import ConfigError
from deltamem_agents.serving.engine import GenerationDone, GenerationSettings
from deltamem_agents.serving.repetition import RepetitionSettings
from deltamem_agents.serving.tool_choice import choose_action, continuation_logprobs, sequence_logprobs
from deltamem_agents.serving.tool_grammar import ToolSpec, ground, tool_specs
from examples.ticketing_bot.tool_choice import load_requests, max_ngram_count


def lookup_ticket(ticket_id: int) -> str:
    """Look up a ticket."""
    return "ok"


def create_ticket(title: str) -> str:
    """Open a ticket."""
    return "ok"


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def test_cropped_cache_scores_match_full_forwards(engine):
    prompt = engine.render_prompt([{"role": "user", "content": "hello"}])
    continuations = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("abc", "x", "hello there")]
    cropped = continuation_logprobs(engine, None, prompt, continuations)
    for ids, scores in zip(continuations, cropped):
        full = sequence_logprobs(engine, None, torch.cat([prompt, torch.tensor(ids)]), prompt.shape[0])
        assert scores == pytest.approx(full, abs=1e-4)


def test_choose_action_scores_every_allowed_action(engine):
    specs = tool_specs([{"name": "a_tool", "description": "does a"}, {"name": "b_tool", "description": "does b"}])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "do b please"}]
    choice = choose_action(engine, None, messages, specs, allow_reply=True)
    assert set(choice.scores) == {"a_tool", "b_tool", "reply"} and choice.method == "channel"
    assert choice.action == max(choice.scores, key=choice.scores.get)
    forced = choose_action(engine, None, messages, specs, allow_reply=True, reply_bias=1e6)
    assert forced.action == "reply"
    assert choose_action(engine, None, messages, specs[:1], allow_reply=False).action == "a_tool"


@pytest.mark.parametrize("mode", ["auto", "any"])
def test_likelihood_choice_decodes_the_chosen_action(engine, mode):
    chat = DeltaMemChat(engine=engine, max_new_tokens=60, tool_scoring="likelihood")
    reply = chat.bind_tools([lookup_ticket, create_ticket], tool_choice=mode).invoke([HumanMessage("ticket 4?")])
    chosen = reply.response_metadata["tool_choice"]["action"]
    assert chosen in {"lookup_ticket", "create_ticket"} | ({"reply"} if mode == "auto" else set())
    if reply.tool_calls:
        assert reply.tool_calls[0]["name"] == chosen
    elif reply.response_metadata["finish_reason"] == "stop":
        assert chosen == "reply" and reply.content


def test_ground_turns_live_values_into_an_enum_and_drops_empty_tools():
    specs = tool_specs(
        [{"name": "lookup_ticket", "parameters": {"type": "object", "properties": {"ticket_id": {"type": "integer"}}}}]
    )
    grounded = ground(specs, {"lookup_ticket": {"ticket_id": [3, 8, 3]}})
    assert grounded[0].parameters["properties"]["ticket_id"] == {"type": "integer", "enum": [3, 8]}
    assert ground(specs, {"lookup_ticket": {"ticket_id": []}}) == []
    assert ground(specs, {}) == specs
    with pytest.raises(ConfigError, match="no argument"):
        ground(specs, {"lookup_ticket": {"id": [1]}})
    assert isinstance(grounded[0], ToolSpec)


def test_value_providers_keep_calls_on_live_values(engine):
    seen = []

    def open_tickets(config):
        seen.append(config["configurable"]["user_id"])
        return [3]

    chat = DeltaMemChat(
        engine=engine, max_new_tokens=80, value_providers={"lookup_ticket": {"ticket_id": open_tickets}}
    )
    bound = chat.bind_tools([lookup_ticket, create_ticket], tool_choice="any")
    with Script(engine, '{"action": "lookup_ticket", "arguments": {"ticket_id": 5}}'):
        reply = bound.invoke([HumanMessage("ticket 5?")], {"configurable": {"user_id": "dana"}})
    assert reply.tool_calls[0]["args"] == {"ticket_id": 3} and seen == ["dana"]  # 5 is not the user's
    none_open = chat.model_copy(update={"value_providers": {"lookup_ticket": {"ticket_id": lambda config: []}}})
    with Script(engine, '{"action": "lookup_ticket", "arguments": {"ticket_id": 5}}'):
        reply = none_open.bind_tools([lookup_ticket, create_ticket], tool_choice="any").invoke([HumanMessage("5?")])
    assert [c["name"] for c in reply.tool_calls] == ["create_ticket"]  # lookup_ticket was not offered


def test_no_repeat_ngrams_and_the_cycle_stop(engine):
    prompt = engine.render_prompt([{"role": "user", "content": "hi"}])

    def run(text, repetition):
        settings = GenerationSettings(max_new_tokens=40, controls=(repetition,) if repetition else ())
        with Script(engine, text):
            return [e for e in engine.stream(None, prompt, settings) if isinstance(e, GenerationDone)][0]

    looping = "abcd abcd abcd abcd abcd"
    assert run(looping, None).text == looping
    banned = run(looping, RepetitionSettings(ngram_size=4, max_ngram_repeats=1, penalty=1.0, stop_on_cycle=False))
    assert max_ngram_count(engine.tokenizer, banned.text) <= 1
    cycle = RepetitionSettings(max_ngram_repeats=100, penalty=1.0, stop_on_cycle=True)
    stopped = run("It is open. It is open. It is open.", cycle)
    assert stopped.text == "It is open. It is open." and stopped.finish_reason == "stop"


def test_repetition_control_keeps_calls_parseable(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=120)  # repetition control on by default
    call = '{"action": "create_ticket", "arguments": {"title": "aaaa aaaa aaaa aaaa"}}'
    with Script(engine, call):
        reply = chat.bind_tools([create_ticket]).invoke([SystemMessage("s"), HumanMessage("open one")])
    assert reply.tool_calls[0]["name"] == "create_ticket"  # a looping value is cut short, the call still parses
    assert reply.tool_calls[0]["args"]["title"] != "aaaa aaaa aaaa aaaa"
    with Script(engine, '{"action": "reply", "text": "ok. ok. ok. ok."}'):
        reply = chat.bind_tools([create_ticket]).invoke([HumanMessage("hi")])
    assert reply.content == "ok. ok."


def test_the_request_set_is_large_varied_and_split_in_fixed_halves():
    everything = load_requests("all")
    tune, held = load_requests("tune"), load_requests("held-out")
    items = [i for s in everything.values() for i in s["items"]]
    assert len(everything) >= 4 and all(5 <= len(s["tools"]) <= 8 for s in everything.values())
    assert len(items) >= 120 and sum(i[1] == "reply" for i in items) >= 0.3 * len(items)
    for name, spec in everything.items():
        a, b = {i[0] for i in tune[name]["items"]}, {i[0] for i in held[name]["items"]}
        assert not a & b and a | b == {i[0] for i in spec["items"]} and abs(len(a) - len(b)) <= 1
        for text, _, stated in spec["items"]:
            assert all(str(v) in text for v in stated.values())


def test_copy_bias_pulls_argument_values_from_the_request(engine):
    from deltamem_agents.serving.repetition import CopyBias

    prompt = engine.render_prompt([{"role": "user", "content": "hi"}])
    ids = engine.tokenizer("zq", add_special_tokens=False)["input_ids"]
    settings = GenerationSettings(max_new_tokens=30, controls=(CopyBias(frozenset(ids), bonus=1e4, after="x"),))
    with Script(engine, "ax ab"):
        done = [e for e in engine.stream(None, prompt, settings) if isinstance(e, GenerationDone)][0]
    assert done.text.startswith("ax") and set(done.text[2:]) <= set("zq")  # after "x", only request tokens


def test_likelihood_choice_scores_the_conversation_not_the_tool_list(engine, monkeypatch):
    import deltamem_agents.agents.chat as chat_module

    seen = []
    real = chat_module.choose_action
    monkeypatch.setattr(chat_module, "choose_action", lambda e, s, m, *a, **k: seen.append(m) or real(e, s, m, *a, **k))
    chat = DeltaMemChat(engine=engine, max_new_tokens=20, tool_scoring="likelihood")
    chat.bind_tools([lookup_ticket, create_ticket]).invoke([SystemMessage("be nice"), HumanMessage("hi")])
    assert seen == [[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]]


def test_span_arguments_copy_a_span_of_the_request(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=120, span_arguments={"create_ticket": ["title"]})
    bound = chat.bind_tools([create_ticket], tool_choice="any")
    request = "my Laptop is broken since monday"
    with Script(engine, '{"action": "create_ticket", "arguments": {"title": "laptop is broken"}}'):
        kept = bound.invoke([HumanMessage(request)])
    assert kept.tool_calls[0]["args"] == {"title": "laptop is broken"}  # a span (case-insensitive) is kept as is
    with Script(engine, '{"action": "create_ticket", "arguments": {"title": "Update"}}'):
        forced = bound.invoke([HumanMessage(request)])
    title = forced.tool_calls[0]["args"]["title"]
    words = request.lower().split()
    spans = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
    assert title.lower() in spans  # not "Update": only word-aligned spans of the request
    free = DeltaMemChat(engine=engine, max_new_tokens=120).bind_tools([create_ticket], tool_choice="any")
    with Script(engine, '{"action": "create_ticket", "arguments": {"title": "Update"}}'):
        assert free.invoke([HumanMessage(request)]).tool_calls[0]["args"] == {"title": "Update"}  # not declared
    every = chat.model_copy(update={"span_arguments": "strings"}).bind_tools([create_ticket], tool_choice="any")
    with Script(engine, '{"action": "create_ticket", "arguments": {"title": "Update"}}'):
        assert every.invoke([HumanMessage(request)]).tool_calls[0]["args"]["title"].lower() in spans


def test_result_copy_bias_pulls_the_reply_toward_the_tool_result(engine):
    from langchain_core.messages import AIMessage, ToolMessage

    call = {"name": "lookup_ticket", "args": {"ticket_id": 4}, "id": "c1", "type": "tool_call"}
    history = [HumanMessage("ticket 4?"), AIMessage("", tool_calls=[call]), ToolMessage("zq", tool_call_id="c1")]
    chat = DeltaMemChat(engine=engine, max_new_tokens=40, result_copy_bias=1e4, repetition=None)
    for envelope, script in ((True, '{"action": "reply", "text": "ab"}'), (False, "ab")):
        bound = chat.model_copy(update={"reply_envelope": envelope}).bind_tools([lookup_ticket], tool_choice="none")
        with Script(engine, script):
            reply = bound.invoke(history)
        assert reply.content and set(reply.content) <= set("zq")  # the reply text draws only on the result's tokens
        with Script(engine, script):
            assert bound.invoke(history[:1]).content == "ab"  # no result, no bias


def test_the_chosen_action_is_decoded_with_its_own_instructions_only(engine, monkeypatch):
    rendered = []
    real = engine.render_prompt
    monkeypatch.setattr(engine, "render_prompt", lambda messages: rendered.append(messages) or real(messages))
    chat = DeltaMemChat(engine=engine, max_new_tokens=60, tool_scoring="likelihood")
    reply = chat.bind_tools([lookup_ticket, create_ticket], tool_choice="any").invoke([HumanMessage("ticket 4?")])
    chosen = reply.response_metadata["tool_choice"]["action"]
    other = ({"lookup_ticket", "create_ticket"} - {chosen}).pop()
    scored, decoded = rendered[0][0]["content"], rendered[-1][0]["content"]
    assert chosen in scored and other in scored  # the turn's prompt lists every tool
    assert f"- {chosen}(" in decoded and other not in decoded  # the decoded envelope sees the chosen one only


def test_copy_tokens_cover_each_word_without_its_leading_space():
    from deltamem_agents.agents.chat import _copy_tokens

    vocab: dict[str, int] = {}

    def word_level(text, add_special_tokens=False):  # " progress" and "progress" are different tokens
        pieces = [("" if i == 0 else " ") + w for i, w in enumerate(text.split(" "))]
        return {"input_ids": [vocab.setdefault(p, len(vocab)) for p in pieces]}

    ids = _copy_tokens(word_level, "set it to in progress.")
    assert vocab["progress"] in ids and vocab["in"] in ids and vocab[" progress."] in ids  # bare and as written
    assert len(ids) == len(set(ids))


def test_a_span_value_ends_at_the_end_of_a_word(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=120, span_arguments={"create_ticket": ["title"]})
    bound = chat.bind_tools([create_ticket], tool_choice="any")
    with Script(engine, '{"action": "create_ticket", "arguments": {"title": "10:"}}'):
        reply = bound.invoke([HumanMessage("call me at 10:30 please")])
    assert reply.tool_calls[0]["args"] == {"title": "10:30"}  # not "10:": the value runs on to the word's end


def test_combine_counts_a_value_only_where_the_any_choice_was_right():
    from examples.ticketing_bot.tool_choice import combine

    choice = [
        {"set": "s", "mode": "any", "request": "a", "expected": "t", "chosen": "t"},
        {"set": "s", "mode": "any", "request": "b", "expected": "t", "chosen": "u"},
        {"set": "s", "mode": "auto", "request": "b", "expected": "t", "chosen": "t"},  # auto rows do not count
    ]
    named = [
        {"set": "s", "request": "a", "copied": {"x": True, "y": False}},
        {"set": "s", "request": "b", "copied": {"x": True}},
    ]
    assert combine(choice, named) == {"s": (1, 3), "all": (1, 3)}


def test_a_span_value_opens_with_the_bare_quote():
    from deltamem_agents.serving.span_copy import SpanCopy

    # like SmolLM2's: ' ",' opens a string and writes a comma at once
    tokenizer = VocabTokens(['{"', "day", '":', ' "', ' ",', "Wed", "nesday", '"', ", 11"])
    state = SpanCopy("Could it be moved to Wednesday at 11:15?", frozenset({"day"}), tokenizer).start()
    produced = []
    for token in (0, 1, 2):  # {"day":
        produced.append(token)
        state.observe(token, produced, tokenizer.decode(produced))
    logits = torch.zeros(len(tokenizer))
    logits[4] = 5.0  # the model prefers ' ",'
    state.adjust(logits)
    assert int(logits.argmax()) == 3 and logits[4] == float("-inf")  # only the bare ' "' may open the value
    produced.append(3)
    state.observe(3, produced, tokenizer.decode(produced))
    logits = torch.zeros(len(tokenizer))
    logits[8] = 5.0  # ", 11" is no span start
    state.adjust(logits)
    assert int(logits.argmax()) == 5 and torch.isfinite(logits).sum() == 1  # "Wed" starts "Wednesday"


def test_a_span_value_closes_at_the_end_of_the_source_after_its_full_stop():
    from deltamem_agents.serving.span_copy import SpanCopy

    # a span that reaches the request's final "." can only close (it once ran on freely)
    tokenizer = VocabTokens(['{"', "title", '":', ' "', "Fix", " it", ".", '"', " Please", " again"])

    def allowed_after(source, tokens):
        state = SpanCopy(source, frozenset({"title"}), tokenizer).start()
        produced = []
        for token in tokens:
            produced.append(token)
            state.observe(token, produced, tokenizer.decode(produced))
        logits = torch.zeros(len(tokenizer))
        state.adjust(logits)
        return {tokenizer.vocab[i] for i in torch.isfinite(logits).nonzero().flatten().tolist()}

    closers = {t for t in tokenizer.vocab if t.startswith('"')}  # the grammar picks the JSON-valid one
    assert allowed_after("Fix it.", [0, 1, 2, 3, 4, 5, 6]) == closers  # '"Fix it.' : the source ends, close
    assert allowed_after("Fix it. Please", [0, 1, 2, 3, 4, 5, 6]) == closers | {" Please"}  # end here or go on
    assert allowed_after("Fix it.x", [0, 1, 2, 3, 4, 5, 6]) == closers  # nothing continues the span: close
    assert allowed_after("Fixit.", [0, 1, 2, 3, 4]) == closers  # nothing in the vocabulary continues "Fix"


def test_a_reply_alone_is_plain_text_decoded_without_tool_or_json_instructions(engine, monkeypatch):
    rendered = []
    real = engine.render_prompt
    monkeypatch.setattr(engine, "render_prompt", lambda messages: rendered.append(messages) or real(messages))
    chat = DeltaMemChat(engine=engine, max_new_tokens=80, tool_scoring="likelihood", reply_bias=1e6)
    conversation = [SystemMessage("be nice"), HumanMessage("hello")]
    with Script(engine, "-hi there"):  # the choice's one scoring forward takes the first scripted step
        reply = chat.bind_tools([lookup_ticket]).invoke(conversation)
    assert reply.response_metadata["tool_choice"]["action"] == "reply" and reply.content == "hi there"
    assert rendered[-1][0] == {"role": "system", "content": "be nice"}  # the conversation's system message only
    with Script(engine, "hi there"):
        assert chat.bind_tools([lookup_ticket], tool_choice="none").invoke(conversation).content == "hi there"
    assert rendered[-1][0] == {"role": "system", "content": "be nice"}
    enveloped = chat.model_copy(update={"reply_envelope": True}).bind_tools([lookup_ticket], tool_choice="none")
    with Script(engine, "hi there"):  # inside the envelope the grammar writes its head: the model cannot say this
        assert enveloped.invoke(conversation).content != "hi there"
    with Script(engine, '{"action": "reply", "text": "hi there"}'):
        assert enveloped.invoke(conversation).content == "hi there"
    from langchain_core.messages import AIMessage, ToolMessage

    call = {"name": "lookup_ticket", "args": {"ticket_id": 4}, "id": "c1", "type": "tool_call"}
    after_call = [*conversation, AIMessage("", tool_calls=[call]), ToolMessage("open", tool_call_id="c1")]
    with Script(engine, '{"action": "reply", "text": "it is open"}'):  # after a call: the envelope, not a copy
        assert chat.bind_tools([lookup_ticket], tool_choice="none").invoke(after_call).content == "it is open"


@pytest.mark.parametrize("window", [False, True])
def test_the_choice_scores_the_current_turn_unless_told_to_see_the_window(engine, monkeypatch, window):
    import deltamem_agents.agents.chat as chat_module

    seen = []
    real = chat_module.choose_action
    monkeypatch.setattr(
        chat_module,
        "choose_action",
        lambda e, s, messages, *a, **k: seen.append(messages) or real(e, s, messages, *a, **k),
    )
    chat = DeltaMemChat(engine=engine, max_new_tokens=20, tool_scoring="likelihood", choice_window=window)
    history = [
        SystemMessage("be brief"),
        HumanMessage("older question"),
        AIMessage("older answer"),
        HumanMessage("ticket 4?"),
    ]
    chat.bind_tools([lookup_ticket, create_ticket], tool_choice="auto").invoke(history)
    contents = [m["content"] for m in seen[0]]
    assert seen[0][0]["role"] == "system" and contents[-1] == "ticket 4?"
    assert ("older question" in contents and "older answer" in contents) == window


def test_quote_token_ids_split_closers_from_bare_openers():
    from deltamem_agents.serving.span_copy import closing_quote_ids, opening_quote_ids

    tokenizer = VocabTokens(['"', ' "', '",', ' ",', "a", 'b"', '"}'])
    assert closing_quote_ids(tokenizer) == (0, 2, 6)  # a token that starts with the quote ends a value
    assert opening_quote_ids(tokenizer) == (0, 1)  # only a bare quote (spaces allowed) opens one
