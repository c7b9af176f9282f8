"""Invocation params, run metadata and LLM-cache keys describe the model, never the thread: no memory bytes, state
keys or watermark in them; and an LLM cache hit cannot lose a memory update (the memory follows the messages)."""

import pytest
from graph_worker import fresh
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from setups import CHECKPOINTED, graph_of
from tiny_chat import tiny_engine

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.serving.engine import MemoryEngine


class Recorder(BaseCallbackHandler):
    """Everything the callback system sees of each chat model call."""

    def __init__(self):
        self.starts: list[dict] = []

    def on_chat_model_start(self, serialized, messages, **kwargs):
        self.starts.append({"serialized": serialized, **kwargs})


class RecordingCache(InMemoryCache):
    def __init__(self):
        super().__init__()
        self.llm_strings: list[str] = []

    def lookup(self, prompt, llm_string):
        self.llm_strings.append(llm_string)
        return super().lookup(prompt, llm_string)


@pytest.fixture(scope="module")
def chat():
    return DeltaMemChat(engine=tiny_engine(), max_new_tokens=4, window_messages=2)


@pytest.fixture
def cache():
    recording = RecordingCache()
    set_llm_cache(recording)
    yield recording
    set_llm_cache(None)


def secrets_of(chat, thread: str) -> list[str]:
    """What must never appear in a call's params, metadata or cache key: the thread's memory bytes (as hex and
    as the repr of bytes) and its state keys."""
    keys = chat.store.keys_of(thread)
    memories = [chat.store.get(k) for k in keys]
    return keys + [m.hex()[:64] for m in memories] + [repr(m)[2:66] for m in memories]


@pytest.mark.parametrize("setup", CHECKPOINTED)
def test_no_memory_in_invocation_params_metadata_or_cache_keys(setup, chat, cache):
    chat = fresh(chat)
    recorder = Recorder()
    graph = graph_of(setup, chat, InMemorySaver())
    config = {"configurable": {"thread_id": "private"}, "callbacks": [recorder]}
    for text in ("my pin is 4417", "and my cat is Tom", "what is my pin?"):
        graph.invoke({"messages": [HumanMessage(text)]}, config)
    secrets = secrets_of(chat, "private")
    assert len(chat.store.keys_of("private")) == 2 and recorder.starts and cache.llm_strings
    for start in recorder.starts:
        params = start["invocation_params"]
        assert not {k for k in params if k.startswith("deltamem")}, params  # none of our keywords
        assert params["memory_fingerprint"] == chat.engine.fingerprint()  # the model, so caches tell adapters apart
        seen = repr(start)
        assert not [s for s in secrets if s in seen]
        assert "written" not in repr(start["options"]) and "memory" not in repr(start.get("metadata", {}))
    assert not [s for llm_string in cache.llm_strings for s in secrets if s in llm_string]


def test_a_cache_hit_skips_the_turn_but_never_loses_the_memory(chat, cache, monkeypatch):
    chat = fresh(chat)
    truth = fresh(chat)
    streams = []
    original = MemoryEngine.stream
    monkeypatch.setattr(MemoryEngine, "stream", lambda self, *a, **k: streams.append(1) or original(self, *a, **k))
    history = [HumanMessage("my pin is 4417"), AIMessage("noted"), HumanMessage("and my cat is Tom")]
    first = chat.invoke(history, {"configurable": {"thread_id": "A"}})
    assert len(streams) == 1 and first.response_metadata["memory_tokens_written"] > 0
    again = chat.invoke(history, {"configurable": {"thread_id": "B"}})  # the same prompt: served from the cache
    assert len(streams) == 1 and again.content == first.content
    assert chat.store.owners() == ["A"]  # the cached call ran no turn, so B used no state yet
    later = history + [AIMessage(again.content), HumanMessage("what is my pin?")]
    reply = chat.invoke(later, {"configurable": {"thread_id": "B"}})
    assert len(streams) == 2
    assert chat.stored_memory(later) == truth.memory_of(later).to_bytes()  # the skipped turn's messages included
    assert (
        reply.response_metadata["memory_tokens_written"]
        == truth.engine.write(
            None,
            [
                {"role": "user", "content": "and my cat is Tom"},
                {"role": "assistant", "content": again.content},
            ],
        )[1]
    )  # found turn A's state of the first pair, wrote the rest


def test_the_cache_tells_adapters_apart(chat, cache, monkeypatch):
    streams = []
    original = MemoryEngine.stream
    monkeypatch.setattr(MemoryEngine, "stream", lambda self, *a, **k: streams.append(1) or original(self, *a, **k))
    history = [HumanMessage("hello there")]
    DeltaMemChat(engine=chat.engine, max_new_tokens=4).invoke(history)
    DeltaMemChat(engine=tiny_engine(seed=5), max_new_tokens=4).invoke(history)  # another adapter: no hit
    DeltaMemChat(engine=chat.engine, max_new_tokens=4).invoke(history)  # the first again: a hit
    assert len(streams) == 2
