"""The write schedule: the state is a function of the written messages alone, and the chat, the trainer, the
evaluation and the benchmark all write, prompt and decode through the same functions."""

import pytest
import torch
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from tiny_chat import tiny_engine, tiny_lm

from deltamem_agents import MemoryState
from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.agents.graph import build_chatbot
from deltamem_agents.core.attach import decoder_of
from deltamem_agents.core.carrier import CURRENT_CALL
from deltamem_agents.serving import turn_plan, write_schedule
from deltamem_agents.serving.engine import MemoryEngine
from deltamem_agents.serving.templating import render_chat
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.episodes import Episode
from deltamem_agents.train.objective import write_pass

MESSAGES = [
    {"role": "user", "content": "my cat is called Tom"},
    {"role": "assistant", "content": "nice, Tom it is"},
    {"role": "system", "content": "never written"},
    {"role": "user", "content": "ticket 4411 is about a laptop"},
    {"role": "assistant", "content": "noted: 4411, laptop"},
    {"role": "tool", "content": "status: waiting for parts"},
    {"role": "user", "content": "the fix I tried was the power button"},
]


def engine_for(write: str) -> MemoryEngine:
    return tiny_engine(write=write)  # memory parameters set to seeded non-trivial values


def chat_dict(message) -> dict:
    return {"role": {"human": "user", "ai": "assistant"}[message.type], "content": message.text}


def write_grouped(engine: MemoryEngine, groups: list[int]) -> MemoryState:
    state, start = None, 0
    for size in groups:
        state, _ = engine.write(state, MESSAGES[start : start + size])
        start += size
    assert start == len(MESSAGES)
    return state


@pytest.mark.parametrize("write", ["token", "segment", "multi"])
def test_the_same_messages_grouped_three_ways_give_identical_states(write):
    engine = engine_for(write)
    whole = write_grouped(engine, [len(MESSAGES)])
    assert not whole.is_zero()
    assert torch.equal(whole.tensor, write_grouped(engine, [2, 2, 3]).tensor)
    assert torch.equal(whole.tensor, write_grouped(engine, [1] * len(MESSAGES)).tensor)


def test_system_messages_and_the_placeholder_are_not_written():
    engine = engine_for("token")
    ids = write_schedule.render_for_writing(engine.tokenizer, MESSAGES[0])
    text = engine.tokenizer.decode(ids.tolist())
    assert text.startswith("<|im_start|>user") and "my cat is called Tom" in text and "system" not in text
    pieces = write_schedule.message_pieces(engine.tokenizer, MESSAGES)
    assert len(pieces) == len(MESSAGES) - 1  # one call per non-system message
    alone, _ = engine.write(None, [MESSAGES[2]])
    assert alone.is_zero()


def test_a_long_message_is_written_in_pieces_the_same_way_every_time():
    engine = engine_for("token")
    long = {"role": "user", "content": "word " * 80}
    pieces = write_schedule.message_pieces(engine.tokenizer, [long], max_piece_tokens=64)
    assert len(pieces) > 2 and all(p.shape[0] <= 64 for p in pieces)
    assert torch.equal(torch.cat(pieces), write_schedule.render_for_writing(engine.tokenizer, long))


class CallRecorder:
    """Records every forward call of the decoder that writes memory: token ids and segment ids per row."""

    def __init__(self, model):
        self.calls: list[tuple[list[int], list[int] | None]] = []
        self.handle = decoder_of(model).register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        context = CURRENT_CALL.get()
        if context is None or not context.carrier.writes:
            return
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        segments = context.segment_ids
        for row in range(ids.shape[0]):
            keep = mask[row].bool() if mask is not None else torch.ones_like(ids[row], dtype=torch.bool)
            seg = segments[row][keep].tolist() if segments is not None else None
            self.calls.append((ids[row][keep].tolist(), seg))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("write", ["token", "segment"])
def test_chat_in_a_checkpointed_graph_and_the_trainer_write_the_same_calls_and_state(write):
    engine = engine_for(write)
    chat = DeltaMemChat(engine=engine, max_new_tokens=5, window_messages=2)
    graph = build_chatbot(chat, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "same"}}
    recorder = CallRecorder(engine.model)
    try:
        for text in ("my cat is Tom", "ticket 4411: laptop", "I pressed the power button", "what was the ticket?"):
            state = graph.invoke({"messages": [HumanMessage(text)]}, config)
        chat_calls = list(recorder.calls)
        history = state["messages"][:-2]  # everything before the newest user message and its reply
        episode = Episode.from_json(
            {
                "id": "same",
                "sessions": [{"messages": [chat_dict(m) for m in history]}],
                "questions": [{"question": state["messages"][-2].text, "answer": "4411"}],
            }
        )
        recorder.calls.clear()
        batch = collate([encode_example(engine.tokenizer, episode)])
        states, _ = write_pass(engine.model, batch)
        trainer_calls = list(recorder.calls)
    finally:
        recorder.close()
    assert len(chat_calls) == len(history) == 6
    assert chat_calls == trainer_calls  # same token ids, message (segment) ids and call boundaries
    chat_state = MemoryState.from_bytes(chat.stored_memory(state["messages"])).tensor  # (L, 1, H, r, r)
    torch.testing.assert_close(torch.stack([s.detach() for s in states]), chat_state, rtol=1e-5, atol=1e-7)


def test_chat_trainer_eval_and_bench_all_go_through_the_shared_functions(monkeypatch, tmp_path):
    from deltamem_agents.bench.turns import bench_turns
    from deltamem_agents.eval import runner
    from deltamem_agents.eval.tasks import EvalConversation, EvalQuestion
    from deltamem_agents.train.objective import batch_loss

    used: dict[str, set[str]] = {"write": set(), "prompt": set(), "decode": set()}
    who = {"now": ""}

    def spy(kind, original):
        def wrapper(*args, **kwargs):
            used[kind].add(who["now"])
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(write_schedule, "run_write_calls", spy("write", write_schedule.run_write_calls))
    monkeypatch.setattr(turn_plan, "build_read_prompt", spy("prompt", turn_plan.build_read_prompt))
    monkeypatch.setattr(MemoryEngine, "stream", spy("decode", MemoryEngine.stream))
    for module in ("deltamem_agents.eval.methods", "deltamem_agents.train.batching", "deltamem_agents.bench.turns"):
        monkeypatch.setattr(f"{module}.build_read_prompt", spy("prompt", turn_plan.build_read_prompt))

    engine = engine_for("token")
    who["now"] = "chat"
    chat = DeltaMemChat(engine=engine, max_new_tokens=3)
    chat.invoke([HumanMessage("hi"), HumanMessage("and again")])

    who["now"] = "trainer"
    episode = Episode.from_json(
        {"id": "e", "sessions": [{"messages": MESSAGES[:2]}], "questions": [{"question": "cat?", "answer": "Tom"}]}
    )
    batch_loss(engine.model, collate([encode_example(engine.tokenizer, episode)] * 2))

    who["now"] = "eval"
    conversations = [
        EvalConversation(
            f"c{i}",
            tuple(MESSAGES[:2]),
            tuple((m["role"], m["content"]) for m in MESSAGES[:2]),
            (EvalQuestion("cat?", "Tom", 1),),
        )
        for i in range(2)
    ]
    runner.evaluate(engine.model, engine.tokenizer, "toy", conversations, ["delta"], tmp_path, max_new_tokens=2)

    who["now"] = "bench"
    plain = tiny_lm()
    bench_turns(plain, engine.tokenizer, torch.device("cpu"), quick=True, turns=2, answer_tokens=2, window=2)

    for kind, users in used.items():
        expected = {"chat", "eval", "bench"} | ({"trainer"} if kind != "decode" else set())  # training never decodes
        assert expected <= users, (kind, users)


def test_the_read_prompt_is_built_one_way():
    prompt = turn_plan.build_read_prompt(["be brief"], ["user: cat Tom"], [{"role": "user", "content": "cat?"}])
    assert prompt[0] == {
        "role": "system",
        "content": "be brief\n\nNotes from earlier in this conversation:\n- user: cat Tom",
    }
    assert prompt[1:] == [{"role": "user", "content": "cat?"}]
    assert turn_plan.build_read_prompt([], [], [{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]


def test_render_chat_still_marks_message_tokens():
    engine = engine_for("token")
    rendered = render_chat(engine.tokenizer, MESSAGES[:2])
    assert set(rendered.message_index.tolist()) <= {-1, 0, 1}


def test_a_prompt_is_never_cut_from_the_left_and_the_reply_stops_at_the_context():
    from deltamem_agents.core.errors import MessageError
    from deltamem_agents.serving.engine import GenerationDone, GenerationSettings

    engine = tiny_engine(max_context=64)
    too_long = torch.arange(3, 3 + 70) % 90 + 3  # (70,)
    with pytest.raises(MessageError, match="nothing of it was cut"):
        list(engine.stream(None, too_long, GenerationSettings(max_new_tokens=4)))
    prompt = too_long[:60]
    events = list(engine.stream(None, prompt, GenerationSettings(max_new_tokens=30, ignore_eos=True)))
    done = events[-1]
    assert isinstance(done, GenerationDone)
    assert done.prompt_tokens == 60 and done.completion_tokens == 4 and done.finish_reason == "length"


def test_planning_a_turn_does_not_change_its_input():
    chat = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "word " * 200},
    ]
    before = [dict(m) for m in chat]
    policy = turn_plan.WindowPolicy(messages=2, max_tokens=40, recall="latent")
    plan = turn_plan.plan_chat_turn(chat, ["a", "b", "c", "d"], (), policy, lambda text: len(text.split()))
    assert chat == before  # the cut user message is only in the prompt
    assert plan.prompt[-1]["content"].startswith("[…]") and len(plan.prompt[-1]["content"]) < len(chat[-1]["content"])
