"""Run methods over a task with per-conversation result caching (a stopped evaluation resumes where it left off)."""

import json
import time
from pathlib import Path

import torch

from deltamem_agents import MemoryState, adapter_fingerprint, has_memory, new_cache
from deltamem_agents.core.attach import attachment_of
from deltamem_agents.core.backbones import resolve
from deltamem_agents.eval.methods import METHODS, build_prompt
from deltamem_agents.eval.scoring import score
from deltamem_agents.eval.tasks import EvalConversation
from deltamem_agents.serving.templating import render_chat
from deltamem_agents.train.synthetic import SYSTEM_PROMPT


@torch.no_grad()
def write_state(model, tokenizer, conversation: EvalConversation, system_prompt: str, max_chunk: int = 1024):
    """Write a conversation into a fresh memory: the rendered [system, *messages], fed in pieces of at most
    ``max_chunk`` tokens cut at message boundaries, the state carried between pieces (the KV cache is not)."""
    rendered = render_chat(tokenizer, [{"role": "system", "content": system_prompt}, *conversation.messages])
    ids, owners = rendered.input_ids, rendered.message_index  # (T,), (T,)
    segments = rendered.segment_ids()
    bounds, start = [], 0
    while start < len(ids):
        end = min(start + max_chunk, len(ids))
        if end < len(ids):
            cut = end
            while cut > start + 1 and owners[cut] == owners[cut - 1]:
                cut -= 1
            end = cut if cut > start + 1 else end
        bounds.append((start, end))
        start = end
    state = None
    device = next(model.parameters()).device
    decoder = resolve(model, attachment_of(model).spec.base_model)  # no LM head: only the state is needed
    for start, end in bounds:
        cache = new_cache(model, state, writes=True)
        piece = segments[start:end]
        valid = piece[piece >= 0]
        if len(valid):
            cache.set_segment_ids((piece - valid.min()).clamp_min(-1).masked_fill(piece < 0, -1)[None].to(device))
        else:
            cache.set_segment_ids(piece[None].to(device))
        decoder(input_ids=ids[None, start:end].to(device), cache=cache, use_cache=True)
        state = cache.memory_state()
    return state


@torch.no_grad()
def answer(model, tokenizer, messages: list[dict], state: MemoryState | None, max_new_tokens: int) -> tuple[str, int]:
    """Greedy answer to the prompt, reading ``state`` with writes off (None: exactly the backbone)."""
    device = next(model.parameters()).device
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ].to(device)
    kwargs = {"cache": new_cache(model, state, writes=False)} if has_memory(model) else {}
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        **kwargs,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip(), int(ids.shape[1])


def evaluate(
    model,
    tokenizer,
    task: str,
    conversations: list[EvalConversation],
    methods: list[str],
    out_dir: str | Path,
    questions_per_conversation: int | None = None,
    max_new_tokens: int = 24,
    window: int = 2,
    max_prompt_tokens: int = 2048,
    system_prompt: str = SYSTEM_PROMPT,
    log=print,
) -> list[dict]:
    """Answer every (limited) question of every conversation with every method; one record per answer.

    Results are cached per (task, method, conversation) as JSON under ``out_dir``; δ-mem methods key the cache
    by the adapter fingerprint, states by conversation. Returns all records (cached and new).
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    fingerprint = adapter_fingerprint(model) if has_memory(model) else None
    if any(METHODS[m].memory for m in methods) and fingerprint is None:
        raise ValueError("δ-mem methods need an adapter: load one (--adapter) or leave them out")

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
                state = write_state(model, tokenizer, conversation, system_prompt)
                seconds = time.perf_counter() - tick
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(state.to_bytes())
                meta.write_text(json.dumps({"s": seconds}))
                states[conversation.id] = (state, seconds)
        return states[conversation.id]

    records = []
    for index, conversation in enumerate(conversations):
        questions = _subset(conversation.questions, questions_per_conversation)
        for name in methods:
            method = METHODS[name]
            key = f"{name}-{fingerprint}" if method.memory else name
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
                prediction, prompt_tokens = answer(model, tokenizer, messages, state, max_new_tokens)
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
                        **score(prediction, q.answer, q.category),
                    }
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))
            records += rows
            log(f"{task} {conversation.id} {name}: contains {sum(r['contains'] for r in rows)}/{len(rows)}")
    return records


def _subset(questions, limit: int | None):
    """At most ``limit`` questions, evenly spaced over the conversation's list (deterministic)."""
    if limit is None or len(questions) <= limit:
        return list(questions)
    step = len(questions) / limit
    return [questions[int(i * step)] for i in range(limit)]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
