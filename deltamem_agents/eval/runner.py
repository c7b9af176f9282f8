"""Run methods over a task with per-conversation result caching (a stopped evaluation resumes where it left off)."""

import hashlib
import json
import time
from pathlib import Path

from deltamem_agents import MemoryState, adapter_fingerprint, detach_memory, has_memory
from deltamem_agents.eval.methods import METHODS, build_prompt
from deltamem_agents.eval.scoring import score
from deltamem_agents.eval.tasks import EvalConversation
from deltamem_agents.serving import write_schedule
from deltamem_agents.serving.engine import GenerationDone, GenerationSettings, MemoryEngine
from deltamem_agents.serving.prompts import SYSTEM_PROMPT

# Pinned decoding of every recall evaluation (greedy, no repetition control, short answers); recorded in every
# result row, and independent of the chat's defaults.
EVAL_DECODING = GenerationSettings(max_new_tokens=24)


def write_state(model, tokenizer, conversation: EvalConversation) -> MemoryState:
    """Write a conversation into a fresh memory under the write schedule (the chat's; system messages are not
    written)."""
    state, _ = write_schedule.write_messages(model, tokenizer, list(conversation.messages))
    return state


def answer(engine: MemoryEngine, messages: list[dict], state: MemoryState | None, settings: GenerationSettings):
    """The decoded answer to the read prompt ``messages`` (the chat's decoder, reading ``state`` with writes off;
    None: the empty memory, exactly the backbone) and the prompt's length in tokens."""
    done = None
    for event in engine.stream(state, engine.render_prompt(messages), settings):
        if isinstance(event, GenerationDone):
            done = event
    return done.text.strip(), done.prompt_tokens


def evaluate(
    model,
    tokenizer,
    task: str,
    conversations: list[EvalConversation],
    methods: list[str],
    out_dir: str | Path,
    questions_per_conversation: int | None = None,
    max_new_tokens: int = EVAL_DECODING.max_new_tokens,
    window: int = 2,
    max_prompt_tokens: int = 2048,
    system_prompt: str = SYSTEM_PROMPT,
    log=print,
) -> list[dict]:
    """Answer every (limited) question of every conversation with every method; one record per answer.

    Results are cached per (task, method, conversation, answer settings: decoding, window, prompt cap, system
    prompt, question subset) as JSON under ``out_dir``; δ-mem methods also key the cache by the adapter
    fingerprint, states by conversation. Returns all records (cached and new).
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    fingerprint = adapter_fingerprint(model) if has_memory(model) else None
    if any(METHODS[m].memory for m in methods) and fingerprint is None:
        raise ValueError("δ-mem methods need an adapter: load one (--adapter) or leave them out")
    attached_here = not has_memory(model)
    engine = MemoryEngine(model, tokenizer)  # without an adapter: zero-init memory, read only as the empty state
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    decoding_record = {"decoding": "greedy", "max_new_tokens": max_new_tokens, "stop": list(settings.stop)}
    # every setting that changes an answer is part of the cache key, so a run with other settings never reuses
    # another run's answers
    answer_settings = {
        **decoding_record,
        "window": window,
        "max_prompt_tokens": max_prompt_tokens,
        "system_prompt": system_prompt,
        "questions_per_conversation": questions_per_conversation,
    }
    settings_key = hashlib.sha256(json.dumps(answer_settings, sort_keys=True).encode()).hexdigest()[:12]

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    states: dict[str, tuple[MemoryState, float]] = {}

    def state_of(index: int) -> tuple[MemoryState, float]:
        conversation = conversations[index]
        if conversation.id not in states:
            path = out_dir / task / f"states-{fingerprint}" / f"{_safe(conversation.id)}.state"
            meta = path.with_suffix(".json")
            if path.is_file() and meta.is_file():
                states[conversation.id] = (MemoryState.from_bytes(path.read_bytes()), json.loads(meta.read_text())["s"])
            else:
                tick = time.perf_counter()
                state = write_state(model, tokenizer, conversation)
                seconds = time.perf_counter() - tick
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(state.to_bytes())
                meta.write_text(json.dumps({"s": seconds}))
                states[conversation.id] = (state, seconds)
        return states[conversation.id]

    try:
        records = []
        for index, conversation in enumerate(conversations):
            questions = _subset(conversation.questions, questions_per_conversation)
            for name in methods:
                method = METHODS[name]
                key = f"{name}-{fingerprint}-{settings_key}" if method.memory else f"{name}-{settings_key}"
                path = out_dir / task / key / f"{_safe(conversation.id)}.json"
                if path.is_file():
                    records += json.loads(path.read_text())
                    continue
                state, write_seconds = None, 0.0
                if method.memory == "own":
                    state, write_seconds = state_of(index)
                elif method.memory == "other":
                    state, write_seconds = state_of((index + 1) % len(conversations))
                rows = []
                for number, q in enumerate(questions):
                    messages = build_prompt(
                        method, conversation, q.question, system_prompt, count_tokens, window, max_prompt_tokens
                    )
                    tick = time.perf_counter()
                    prediction, prompt_tokens = answer(engine, messages, state, settings)
                    latency = time.perf_counter() - tick + write_seconds / max(1, len(questions))
                    rows.append(
                        {
                            "task": task,
                            "method": name,
                            "conversation": conversation.id,
                            "question_index": number,
                            "question": q.question,
                            "answer": q.answer,
                            "category": q.category,
                            "prediction": prediction,
                            "prompt_tokens": prompt_tokens,
                            "latency_s": latency,
                            "adapter": fingerprint if method.memory else None,
                            **decoding_record,
                            **score(prediction, q.answer, q.category),
                        }
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rows, indent=1))
                records += rows
                log(f"{task} {conversation.id} {name}: contains {sum(r['contains'] for r in rows)}/{len(rows)}")
    finally:
        if attached_here:  # leave the caller's model as it was given
            detach_memory(model)
    return records


def _subset(questions, limit: int | None):
    """At most ``limit`` questions, evenly spaced over the conversation's list (deterministic)."""
    if limit is None or len(questions) <= limit:
        return list(questions)
    step = len(questions) / limit
    return [questions[int(i * step)] for i in range(limit)]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
