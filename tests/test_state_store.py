"""The content-addressed state stores and keys: the key names exactly what was written, the longest stored prefix
is found, forgetting removes what only that thread used, an evicted state is recomputed, all stores agree."""

import os

import pytest
from graph_worker import fresh
from langchain_core.messages import AIMessage, HumanMessage
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.store import InMemoryStore, PostgresMemoryStore, SqliteMemoryStore, longest_stored
from deltamem_agents.serving.state_keys import chain, root_key

URL = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")
MESSAGES = [
    {"role": "user", "content": "my cat is Tom"},
    {"role": "assistant", "content": "noted"},
    {"role": "user", "content": "ticket 4411"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def test_keys_name_the_written_tokens_and_the_model(engine):
    keys = engine.state_keys(MESSAGES)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert engine.state_keys(MESSAGES[:2]) == keys[:2]  # a prefix has the prefix's keys
    assert engine.state_keys([{"role": "system", "content": "rules"}, *MESSAGES]) == keys  # never written
    edited = [{"role": "user", "content": "my cat is Tim"}, *MESSAGES[1:]]
    assert not set(engine.state_keys(edited)) & set(keys)  # an earlier change changes every later key
    as_user = [MESSAGES[0], {"role": "user", "content": "noted"}]
    assert engine.state_keys(as_user)[1] != keys[1]  # the role is part of what is written
    assert tiny_engine(seed=5).state_keys(MESSAGES) != keys  # another adapter: other keys
    assert chain(root_key("f", 1024), ["a"]) != chain(root_key("f", 512), ["a"])  # the piece size too


def test_the_longest_stored_prefix_is_found_as_by_a_naive_scan():
    keys = [f"k{i}" for i in range(1203)]
    for stored in ({"k3"}, {"k3", "k700"}, {"k1202"}, set(), {"k0", "k999", "k5"}):
        naive = max((i + 1 for i, k in enumerate(keys) if k in stored), default=0)
        n, key = longest_stored(keys, lambda chunk, stored=stored: {k for k in chunk if k in stored})
        assert n == naive and key == (keys[n - 1] if n else None)


def stores(tmp_path):
    made = [InMemoryStore(), SqliteMemoryStore(tmp_path / "s.db")]
    if URL:
        made.append(PostgresMemoryStore(URL))
    return made


def test_every_store_forgets_only_what_no_other_thread_uses(tmp_path):
    import uuid

    for store in stores(tmp_path):
        run = uuid.uuid4().hex[:8]  # the Postgres store is shared: names of this run only
        a, b, shared, own = f"a-{run}", f"b-{run}", f"shared-{run}", f"own-{run}"
        store.put(shared, b"S" * 40, a)
        store.put(shared, None, b)  # b read the shared state
        store.put(own, b"O" * 40, a)
        assert store.longest([f"x-{run}", shared, f"y-{run}"]) == (2, b"S" * 40)
        assert store.longest([own, f"z-{run}"]) == (1, b"O" * 40) and store.longest([f"z-{run}"]) == (0, None)
        assert store.keys_of(a) == sorted([shared, own]) and store.keys_of(b) == [shared]
        assert store.forget(a) == 1 and store.get(own) is None and store.get(shared) == b"S" * 40
        assert store.forget(b) == 1 and store.get(shared) is None and store.keys_of(b) == []
        assert store.forget(a) == 0  # forgetting twice is harmless


def test_an_evicted_state_is_recomputed_to_the_same_bytes(engine):
    chat = DeltaMemChat(engine=engine, max_new_tokens=3, store=InMemoryStore(max_states=1))
    history = [HumanMessage("my cat is Tom"), AIMessage("noted"), HumanMessage("and?")]
    chat.invoke(history, {"configurable": {"thread_id": "t"}})
    memory = chat.stored_memory(history)
    chat.invoke([HumanMessage("other"), AIMessage("x"), HumanMessage("y")], {"configurable": {"thread_id": "u"}})
    assert chat.stored_memory(history) is None and len(chat.store) == 1  # evicted
    reply = chat.invoke(history, {"configurable": {"thread_id": "t"}})
    assert reply.response_metadata["memory_tokens_written"] > 0 and chat.stored_memory(history) == memory
    assert fresh(chat).memory_of(history).to_bytes() == memory
