"""Hypothesis fuzzing: only our own error types come out of MemoryState.from_bytes and the turn rendering."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from tests_tokenizer import chatml_tokenizer

from deltamem_agents import DeltaMemError, MemoryState
from deltamem_agents.agents.turn import WindowPolicy, plan_turn
from deltamem_agents.serving.templating import render_chat

TOKENIZER = chatml_tokenizer()
VALID = MemoryState(torch.randn(2, 1, 1, 4, 4), "abc", (0, 1)).to_bytes()


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_give_only_memory_state_errors(data):
    try:
        MemoryState.from_bytes(data)
    except DeltaMemError:
        pass


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255), st.integers(0, len(VALID)))
def test_mutated_and_truncated_state_bytes_give_only_our_errors(position, value, cut):
    mutated = bytearray(VALID)
    mutated[position] = value
    for data in (bytes(mutated), VALID[:cut]):
        try:
            state = MemoryState.from_bytes(data)
        except DeltaMemError:
            continue
        assert torch.isfinite(state.tensor).all()


def count_words(text: str) -> int:
    return len(text.split())


message = st.one_of(
    st.builds(HumanMessage, content=st.text(max_size=80)),
    st.builds(AIMessage, content=st.text(max_size=80)),
    st.builds(SystemMessage, content=st.text(max_size=40)),
    st.builds(ToolMessage, content=st.text(max_size=80), tool_call_id=st.just("c1")),
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(message, max_size=12), st.integers(1, 6), st.integers(16, 300))
def test_turn_planning_gives_a_bounded_prompt_or_our_error(messages, window, cap):
    try:
        plan = plan_turn(messages, (), WindowPolicy(messages=window, max_tokens=cap), count_words)
    except DeltaMemError:
        return
    assert plan.prompt and plan.prompt[-1]["role"] in ("user", "assistant", "tool")
    assert len([m for m in plan.prompt if m["role"] != "system"]) <= max(window, 1) + len(messages)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "tool", "system"]), st.text(max_size=40)), max_size=6))
def test_rendering_arbitrary_text_assigns_every_token(pairs):
    messages = [{"role": role, "content": text} for role, text in pairs]
    try:
        rendered = render_chat(TOKENIZER, messages, add_generation_prompt=True)
    except DeltaMemError:
        assert not messages
        return
    assert rendered.input_ids.shape == rendered.message_index.shape
    assert int(rendered.message_index.max()) < len(messages)
    assert int(rendered.message_index.min()) >= -1
    assert all(bool((rendered.message_index == i).any()) for i in range(len(messages)))
