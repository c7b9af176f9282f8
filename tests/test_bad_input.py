"""Bad input gets a clear error (or a documented, sensible behaviour), and nothing is lost."""

import pytest
import torch
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine

from deltamem_agents import MemoryState, MemoryStateError
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot
from deltamem_agents.core.errors import MessageError


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def graph_with_turns(chat, thread="g"):
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": thread}}
    for turn in (1, 2):
        graph.invoke({"messages": [HumanMessage(f"turn {turn}", id=f"u{turn}")]}, config)
    return graph, config


def other_backbone_engine():
    """A qwen2 backbone (instead of the tiny llama) with the same tokenizer, memory shapes and layer count."""
    from tiny_chat import tiny_tokenizer
    from tiny_models import COMMON
    from transformers import AutoModelForCausalLM, Qwen2Config

    from deltamem_agents.serving.engine import MemoryEngine

    torch.manual_seed(0)
    config = Qwen2Config(**{**COMMON, "vocab_size": len(tiny_tokenizer()), "max_position_embeddings": 1024})
    return MemoryEngine(AutoModelForCausalLM.from_config(config).eval(), tiny_tokenizer())


@pytest.mark.parametrize("damage", ["corrupted", "truncated", "nan", "inf", "foreign", "other-backbone"])
def test_bad_memory_in_the_store_fails_clearly_and_keeps_the_checkpoint(engine, damage):
    chat = DeltaMemChat(engine=engine, max_new_tokens=4)
    graph, config = graph_with_turns(chat)
    messages = graph.get_state(config).values["messages"]
    good = chat.stored_memory(messages)
    [key] = chat.store.keys_of("g")
    if damage == "corrupted":
        bad = b"\x00" * 8 + good[8:]
    elif damage == "truncated":
        bad = good[: len(good) // 3]
    elif damage in ("nan", "inf"):
        state = MemoryState.from_bytes(good)
        tensor = state.tensor.clone()  # (L, B, H, r, r)
        tensor[0, 0, 0, 0, 0] = float(damage)
        bad = MemoryState(tensor, state.fingerprint, state.layers).to_bytes()
    else:  # written by another adapter (another seed of the same backbone), or on another backbone
        other_engine = tiny_engine(seed=5) if damage == "foreign" else other_backbone_engine()
        other = DeltaMemChat(engine=other_engine, max_new_tokens=4)
        other_graph, other_config = graph_with_turns(other, "other")
        bad = other.stored_memory(other_graph.get_state(other_config).values["messages"])
    chat.store.put(key, bad, None)  # the stored state damaged in place
    before = graph.get_state(config)
    with pytest.raises(MemoryStateError, match="corrupted|NaN|another adapter|written by adapter"):
        graph.invoke({"messages": [HumanMessage("turn 3", id="u3")]}, config)
    after = graph.get_state(config)
    assert chat.store.get(key) == bad and len(after.values["messages"]) == len(before.values["messages"]) + 1
    chat.store.put(key, good, None)  # restoring the good bytes makes the thread usable again
    assert graph.invoke(None, config)["messages"][-1].type == "ai"


def test_an_empty_message_list_fails_clearly_on_a_new_thread_and_continues_an_existing_one(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=4)
    with pytest.raises(MessageError, match="no messages"):
        chat.invoke([])
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    new = {"configurable": {"thread_id": "empty"}}
    with pytest.raises(MessageError, match="no messages"):
        graph.invoke({"messages": []}, new)
    assert len(chat.store) == 0  # nothing was written for it
    graph, config = graph_with_turns(chat)
    before = graph.get_state(config).values
    after = graph.invoke({"messages": []}, config)  # like any chat graph: the assistant speaks again
    assert after["messages"][: len(before["messages"])] == before["messages"]
    assert len(after["messages"]) == len(before["messages"]) + 1 and after["messages"][-1].type == "ai"
    # the newest user message is still the same: nothing new to write
    assert after["messages"][-1].response_metadata["memory_tokens_written"] == 0


def test_unknown_roles_fail_clearly(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=4)
    with pytest.raises(MessageError, match="unsupported message type ChatMessage"):
        chat.invoke([ChatMessage(role="wizard", content="abracadabra"), HumanMessage("hi")])


def test_a_message_longer_than_the_context_is_written_in_pieces_and_the_window_trimmed():
    engine = tiny_engine(max_context=256)
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, window_tokens=100, notes_tokens=32)
    huge = "word " * 400  # ~2000 tokens with the character tokenizer: far beyond the 256-token context
    messages = [HumanMessage(huge, id="1"), AIMessage("ok", id="2"), HumanMessage(huge + " end", id="3")]
    reply = chat.invoke(messages, {"configurable": {"thread_id": "long"}})
    assert reply.response_metadata["memory_tokens_written"] > 2000  # all of it, in pieces
    assert reply.usage_metadata["input_tokens"] <= 120 + chat.notes_tokens + 60  # window + notes caps + system


def test_caps_that_do_not_fit_the_context_give_a_clear_error_and_keep_the_memory():
    from deltamem_agents.core.errors import MessageError

    engine = tiny_engine(max_context=256)
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, window_tokens=120, notes_tokens=192)
    huge = "word " * 400
    messages = [HumanMessage(huge, id="1"), AIMessage("ok", id="2"), HumanMessage(huge + " end", id="3")]
    with pytest.raises(MessageError, match="nothing of it was cut"):
        chat.invoke(messages, {"configurable": {"thread_id": "tight"}})
    assert chat.stored_memory(messages) is not None  # the write pass was kept


def test_a_huge_tool_result_is_cut_in_the_prompt_but_kept_in_the_state(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, window_tokens=200)
    call = {"name": "dump", "args": {}, "id": "c1"}
    result = "x" * 100_000
    messages = [
        HumanMessage("dump it", id="1"),
        AIMessage("", tool_calls=[call], id="2"),
        ToolMessage(result, tool_call_id="c1", id="3"),
    ]
    reply = chat.invoke(messages)
    assert reply.usage_metadata["input_tokens"] <= 200 + 80  # window cap + system, template and tool prefix
    assert messages[2].content == result  # the caller's messages are untouched


def test_an_unknown_thread_starts_from_an_empty_memory(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=4)
    assert chat.store.keys_of("never-seen") == []
    reply = chat.invoke([HumanMessage("hello")], {"configurable": {"thread_id": "never-seen"}})
    assert reply.response_metadata["memory_tokens_written"] == 0
    assert chat.memory_of([HumanMessage("hello")]).is_zero()
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    assert graph.get_state({"configurable": {"thread_id": "nobody"}}).values == {}


def test_forget_removes_memory_and_checkpoints_from_the_database_file(tmp_path, engine):
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from deltamem_agents.agents.graph import forget_thread
    from deltamem_agents.agents.store import SqliteMemoryStore

    path = tmp_path / "cp.db"
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, store=SqliteMemoryStore(path))  # in the saver's file
    with SqliteSaver.from_conn_string(str(path)) as saver:
        graph = build_chatbot(chat, checkpointer=saver)
        config = {"configurable": {"thread_id": "secret-user"}}
        for turn in (1, 2, 3):
            state = graph.invoke({"messages": [HumanMessage(f"my pin is 4{turn}{turn}7", id=f"p{turn}")]}, config)
        memory = chat.stored_memory(state["messages"])
        assert memory is not None and memory[-4096:] in path.read_bytes() + (tmp_path / "cp.db-wal").read_bytes()
        assert forget_thread(saver, chat, "secret-user") == 2
    connection = sqlite3.connect(path)
    for table in ("checkpoints", "writes", "state_refs"):
        column = "owner" if table == "state_refs" else "thread_id"
        query = f"select count(*) from {table} where {column} = ?"
        assert connection.execute(query, ["secret-user"]).fetchone()[0] == 0
    assert connection.execute("select count(*) from states").fetchone()[0] == 0
    connection.execute("vacuum")
    connection.close()
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"pin is" not in files and memory[-4096:] not in files  # the memory's bytes, not only its rows


def test_stores_take_thread_ids_as_data(tmp_path, engine):
    from deltamem_agents.agents.store import SqliteMemoryStore

    store = SqliteMemoryStore(tmp_path / "s.db")
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, store=store)
    messages = [HumanMessage("a", id="1"), AIMessage("b", id="2"), HumanMessage("c", id="3")]
    chat.invoke(messages, {"configurable": {"thread_id": "alice"}})
    assert store.keys_of("alice") and store.keys_of("bob") == []
    assert store.keys_of("alice%") == [] and store.keys_of("' or '1'='1") == []
    assert store.forget("' or '1'='1") == 0 and store.forget("%") == 0 and store.owners() == ["alice"]
    assert torch.is_tensor(MemoryState.from_bytes(chat.stored_memory(messages)).tensor)


def test_forget_removes_a_standalone_thread_from_the_store_file(tmp_path, engine):
    from deltamem_agents.agents.store import SqliteMemoryStore

    path = tmp_path / "threads.db"
    store = SqliteMemoryStore(path)
    chat = DeltaMemChat(engine=engine, max_new_tokens=4, store=store)

    def turn(thread):
        return [
            HumanMessage(f"{thread}: my pin is 4117", id="1"),
            AIMessage("noted", id="2"),
            HumanMessage("ok", id="3"),
        ]

    for thread in ("secret-user", "other-user"):
        chat.invoke(turn(thread), {"configurable": {"thread_id": thread}})
    secret = chat.stored_memory(turn("secret-user"))
    kept = chat.stored_memory(turn("other-user"))
    assert chat.forget("secret-user") == 1
    assert chat.stored_memory(turn("secret-user")) is None and chat.stored_memory(turn("other-user")) == kept
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("threads.db"))
    assert b"secret-user" not in files and secret[-4096:] not in files  # the row's bytes, not only its key
    assert kept[-4096:] in files and secret != kept
    reply = chat.invoke(turn("secret-user"), {"configurable": {"thread_id": "secret-user"}})  # computed again
    assert reply.response_metadata["memory_tokens_written"] > 0 and chat.stored_memory(turn("secret-user")) == secret
