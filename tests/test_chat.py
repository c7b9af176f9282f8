"""DeltaMemChat on a tiny model: the turn protocol, memory per thread, bounded prompts, tools, streaming."""

import asyncio
import logging

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel
from tiny_chat import Script, tiny_engine

from deltamem_agents import MemoryState
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.store import SqliteMemoryStore
from deltamem_agents.agents.turn import MessageError, to_chat_dict


def lookup_ticket(ticket_id: int) -> str:
    """Look up a support ticket by its number."""
    return f"ticket {ticket_id}: open"


def close_ticket(ticket_id: int, reason: str) -> str:
    """Close a ticket."""
    return "closed"


@pytest.fixture
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=12)


def conversation(turns: int, width: int = 20) -> list:
    messages = [SystemMessage("You help.")]
    for i in range(turns):
        messages += [
            HumanMessage(f"question {i:03d} " + "x" * width, id=f"h{i}"),
            AIMessage(f"answer {i:03d}", id=f"a{i}"),
        ]
    return messages


def test_invoke_stream_and_batch_agree(chat):
    msgs = [HumanMessage("hello there")]
    reply = chat.invoke(msgs)
    assert isinstance(reply, AIMessage)
    assert reply.usage_metadata["input_tokens"] > 0
    assert reply.usage_metadata["output_tokens"] == len(chat.engine.tokenizer(reply.content)["input_ids"]) or (
        reply.response_metadata["finish_reason"] == "length"
    )
    chunks = list(chat.stream(msgs))
    assert len(chunks) >= 2 and "".join(c.content for c in chunks) == reply.content
    assert [r.content for r in chat.batch([msgs, msgs])] == [reply.content, reply.content]
    assert chat.get_num_tokens("abc") == 3


async def test_async_paths_agree_with_sync(chat):
    msgs = [HumanMessage("hello there")]
    reply = chat.invoke(msgs)
    assert (await chat.ainvoke(msgs)).content == reply.content
    assert "".join([c.content async for c in chat.astream(msgs)]) == reply.content
    assert [r.content for r in await chat.abatch([msgs, msgs])] == [reply.content] * 2


async def test_async_generation_does_not_block_the_event_loop(chat):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await chat.ainvoke([HumanMessage("hello " * 50)], max_new_tokens=30)
    task.cancel()
    assert ticks > 5


def test_thread_memory_writes_each_older_message_once(chat):
    cfg = {"configurable": {"thread_id": "t1"}}
    first = [HumanMessage("my name is Ada", id="u1")]
    reply = chat.invoke(first, cfg)
    assert reply.response_metadata["memory_tokens_written"] == 0  # nothing older than the newest user message
    assert len(chat.store) == 0
    second = first + [AIMessage(reply.content, id="a1"), HumanMessage("what is my name?", id="u2")]
    again = chat.invoke(second, cfg)
    assert again.response_metadata["memory_tokens_written"] > 0
    assert chat.store.owners() == ["t1"] and len(chat.store) == 1
    state = MemoryState.from_bytes(chat.stored_memory(second))
    assert not state.is_zero()
    # the same turn again writes nothing new: the state of those messages is stored
    third = chat.invoke(second, cfg)
    assert third.response_metadata["memory_tokens_written"] == 0
    assert MemoryState.from_bytes(chat.stored_memory(second)).equal(state)
    # an edited old message (even with the same id) is other content: the memory follows what the messages say
    edited = [HumanMessage("my name is Bob", id="u1")] + second[1:]
    assert chat.invoke(edited, cfg).response_metadata["memory_tokens_written"] > 0
    assert not MemoryState.from_bytes(chat.stored_memory(edited)).equal(state)
    # a message without an id is addressed by its content too: ids do not matter, only what is written
    anonymous = [HumanMessage("my name is Ada"), AIMessage(reply.content), HumanMessage("what is my name?")]
    assert chat.invoke(anonymous, cfg).response_metadata["memory_tokens_written"] == 0
    assert "t2" not in chat.store.owners()  # other threads untouched


def test_threads_keep_their_own_memory_and_forget_only_their_own(chat):
    a = [HumanMessage("alpha alpha", id="x1"), AIMessage("ok", id="x2"), HumanMessage("and?", id="x3")]
    b = [HumanMessage("beta beta", id="y1"), AIMessage("ok", id="y2"), HumanMessage("and?", id="y3")]
    chat.invoke(a, {"configurable": {"thread_id": "A"}})
    chat.invoke(b, {"configurable": {"thread_id": "B"}})
    alone = DeltaMemChat(engine=chat.engine, max_new_tokens=12)
    alone.invoke(a, {"configurable": {"thread_id": "A"}})
    assert chat.stored_memory(a) == alone.stored_memory(a)
    assert chat.stored_memory(a) != chat.stored_memory(b)
    chat.invoke(a, {"configurable": {"thread_id": "C"}})  # the same messages in another thread: one shared state
    assert len(chat.store) == 2 and chat.store.owners() == ["A", "B", "C"]
    assert chat.forget("A") == 0 and chat.stored_memory(a) is not None  # thread C still uses it
    assert chat.forget("C") == 1 and chat.stored_memory(a) is None and chat.stored_memory(b) is not None


def test_without_a_thread_the_store_is_read_but_never_added_to(chat):
    history = [HumanMessage("alpha alpha"), AIMessage("ok"), HumanMessage("and?")]
    assert chat.invoke(history).response_metadata["memory_tokens_written"] > 0
    assert len(chat.store) == 0  # nobody could ever forget it
    chat.invoke(history, {"configurable": {"session_id": "s"}})  # RunnableWithMessageHistory's key counts
    assert chat.store.owners() == ["s"]
    assert chat.invoke(history).response_metadata["memory_tokens_written"] == 0  # read from the store


def test_prompt_is_bounded_and_flat_once_the_window_is_full(chat):
    chat = DeltaMemChat(engine=chat.engine, max_new_tokens=1, window_messages=4, window_tokens=400, recall="latent")
    sizes = []
    for turn in range(1, 31):
        messages = conversation(turn)[:-1]  # ends with the newest user message
        sizes.append(chat.invoke(messages).usage_metadata["input_tokens"])
    bound = 400 + chat.engine.count_tokens("You help.") + 40  # window cap + system + template
    assert max(sizes) <= bound
    assert len(set(sizes[3:])) == 1  # flat once the window is full
    assert sizes[0] < sizes[3]


def test_retrieval_notes_come_from_this_thread_only_and_are_capped(chat):
    chat = DeltaMemChat(engine=chat.engine, max_new_tokens=1, window_messages=2, notes_tokens=30)
    messages = [HumanMessage("my locker code is zebra 7781", id="m1"), AIMessage("noted", id="m2")]
    messages += conversation(6)[1:]
    messages.append(HumanMessage("what is my locker code?", id="q"))
    reply = chat.invoke(messages, {"configurable": {"thread_id": "notes"}})
    assert reply.response_metadata["retrieved_notes"] >= 1
    other = chat.invoke([HumanMessage("what is my locker code?", id="q2")], {"configurable": {"thread_id": "o"}})
    assert other.response_metadata["retrieved_notes"] == 0


def test_empty_memory_with_default_adapter_does_not_change_the_backbone():
    engine = tiny_engine(trained=False)  # the default: zero-init corrections
    chat = DeltaMemChat(engine=engine, max_new_tokens=10, repetition=None)  # plain greedy, like generate()
    messages = conversation(3)[:-1]
    reply = chat.invoke(messages)
    from deltamem_agents.agents.turn import WindowPolicy, plan_turn

    plan = plan_turn(messages, (), WindowPolicy(recall="latent+retrieval"), engine.count_tokens)
    prompt = engine.render_prompt(plan.prompt)[None]
    from deltamem_agents import detach_memory

    detach_memory(engine.model)
    with torch.no_grad():
        plain = engine.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    expected = engine.tokenizer.decode(plain[0, prompt.shape[1] :], skip_special_tokens=True)
    assert reply.content == expected


def test_scripted_tool_call_parses(chat):
    bound = chat.bind_tools([lookup_ticket, close_ticket])
    with Script(chat.engine, '{"action": "close_ticket", "arguments": {"ticket_id": 7, "reason": "fixed"}}'):
        reply = bound.invoke([HumanMessage("close 7 please")], max_new_tokens=80)
    assert reply.tool_calls[0]["name"] == "close_ticket"
    assert reply.tool_calls[0]["args"] == {"ticket_id": 7, "reason": "fixed"}
    assert reply.response_metadata["finish_reason"] == "tool_calls"


def test_the_grammar_keeps_calls_valid_even_when_the_model_tries_otherwise(chat):
    bound = chat.bind_tools([lookup_ticket], tool_choice="any")
    with Script(chat.engine, '{"action": "lookup_ticket", "arguments": {"ticket_id": "seven"}}'):
        reply = bound.invoke([HumanMessage("x")], max_new_tokens=80)
    assert reply.tool_calls and isinstance(reply.tool_calls[0]["args"]["ticket_id"], int)


def test_a_cut_off_tool_call_becomes_text_with_a_warning(chat, caplog):
    bound = chat.bind_tools([lookup_ticket], tool_choice="any")
    with caplog.at_level(logging.WARNING), Script(chat.engine, '{"action": "lookup_ticket", "arguments": {'):
        reply = bound.invoke([HumanMessage("x")], max_new_tokens=20)
    assert reply.tool_calls == [] and reply.content.startswith('{"action"')
    assert "not a JSON tool envelope" in caplog.text


def test_a_reply_under_the_grammar_is_plain_text_and_streams(chat):
    bound = chat.bind_tools([lookup_ticket])
    with Script(chat.engine, '{"action": "reply", "text": "Hi there, friend"}'):
        chunks = list(bound.stream([HumanMessage("hello")], max_new_tokens=80))
    assert "".join(c.content for c in chunks) == "Hi there, friend"
    assert len([c for c in chunks if c.content]) > 3


def test_structured_output_uses_the_grammar(chat):
    class Ticket(BaseModel):
        title: str
        priority: int

    with Script(chat.engine, '{"action": "Ticket", "arguments": {"title": "printer", "priority": 2}}'):
        ticket = chat.with_structured_output(Ticket).invoke("printer broken, priority 2", max_new_tokens=80)
    assert ticket == Ticket(title="printer", priority=2)


def test_tool_messages_and_ai_tool_calls_render(chat):
    messages = [
        HumanMessage("status of 3?", id="1"),
        AIMessage("", tool_calls=[{"name": "lookup_ticket", "args": {"ticket_id": 3}, "id": "c1"}], id="2"),
        ToolMessage("ticket 3: open", tool_call_id="c1", id="3"),
        HumanMessage("thanks", id="4"),
    ]
    reply = chat.invoke(messages, {"configurable": {"thread_id": "tools"}})
    assert reply.response_metadata["memory_tokens_written"] > 0
    expected = sum(chat.engine.write(None, [m])[1] for m in [to_chat_dict(x) for x in messages[:3]])
    assert reply.response_metadata["memory_tokens_written"] == expected  # the call and its result, written


def test_bad_messages_fail_clearly(chat):
    with pytest.raises(MessageError, match="no messages"):
        chat.invoke([])
    with pytest.raises(MessageError, match="no user"):
        chat.invoke([SystemMessage("only rules")])
    with pytest.raises(Exception, match="reserved"):

        def reply(text: str) -> str:
            """Reserved name."""
            return text

        chat.bind_tools([reply])


def test_sqlite_store_is_inspectable(tmp_path, chat):
    store = SqliteMemoryStore(tmp_path / "states.db")
    chat = DeltaMemChat(engine=chat.engine, max_new_tokens=4, store=store)
    messages = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    chat.invoke(messages, {"configurable": {"thread_id": "user-1"}})
    import sqlite3

    db = sqlite3.connect(tmp_path / "states.db")
    [(key, state, size)] = db.execute("select key, state, state_bytes from states").fetchall()
    assert db.execute("select owner, key from state_refs").fetchall() == [("user-1", key)]
    assert state == chat.stored_memory(messages) and size == len(state)
    assert MemoryState.from_bytes(state).fingerprint == chat.engine.fingerprint()
    assert key == chat.engine.state_keys([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])[-1]
    assert store.forget("user-1") == 1
    assert store.get(key) is None and store.owners() == []


def test_tool_preselection_keeps_the_best_matching_tools():
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from deltamem_agents.serving.tool_grammar import preselect, tool_specs

    def list_my_tickets() -> str:
        """List the user's open tickets."""
        return "[]"

    specs = tool_specs([convert_to_openai_tool(t) for t in (lookup_ticket, close_ticket, list_my_tickets)])
    assert [s.name for s in preselect(specs, "please close ticket 4, it works", 1)] == ["close_ticket"]
    assert [s.name for s in preselect(specs, "show my open tickets", 2)][0] in ("list_my_tickets", "lookup_ticket")
    assert len(preselect(specs, "hello", 1)) == 3  # no word in common: every tool stays


async def test_every_entry_point_finds_the_thread_from_its_config(chat):
    history = [HumanMessage("alpha alpha"), AIMessage("ok"), HumanMessage("and?")]

    def config(thread):
        return {"configurable": {"thread_id": thread}}

    chat.invoke(history, config("invoke"))
    list(chat.stream(history, config("stream")))
    chat.batch([history], config("batch"))
    chat.bind_tools([lookup_ticket]).invoke(history, config("bound"))
    await chat.ainvoke(history, config("ainvoke"))
    [chunk async for chunk in chat.astream(history, config("astream"))]
    await chat.abatch([history], config("abatch"))
    assert chat.store.owners() == sorted(["invoke", "stream", "batch", "bound", "ainvoke", "astream", "abatch"])
    assert len(chat.store) == 1  # one conversation, one state, seven threads using it
