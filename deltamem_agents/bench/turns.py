"""Section c: a scripted multi-turn conversation, stateless full replay vs replay with a kept KV cache vs δ-mem.

Every turn answers the newest user message with the same number of greedy tokens on each side (raw model calls,
no stopping at EOS). The history holds the SCRIPTED assistant replies, so all sides see the same conversation:
- replay: a fresh forward over system + the whole history + the new user message (how API-model agents run);
- kept KV: one growing cache; each turn feeds only the tokens after the cached prefix (the generated answer is
  cropped away and the scripted reply appended), at the price of keeping the KV cache of the whole history;
- δ-mem: the chat's own turn: the write schedule over the messages not yet written (``MemoryEngine.write``), the
  chat's read prompt (system + the last ``window`` messages + the new user message, ``build_read_prompt``) and
  the chat's decoder (``MemoryEngine.stream``, writes off).
Time to first token (TTFT) counts everything before the first answer token: for δ-mem the write pass too (the
decoder's first event comes after the prompt's forward pass and the first token's detokenisation).
"""

import copy

import torch
from transformers import DynamicCache

from deltamem_agents import DeltaMemConfig, attach_memory, new_cache
from deltamem_agents.bench.timing import timed
from deltamem_agents.serving.engine import GenerationSettings, MemoryEngine
from deltamem_agents.serving.turn_plan import build_read_prompt

SYSTEM = "You are a concise support assistant for an online shop. Keep answers short."
PRODUCTS = ["blender", "kettle", "desk lamp", "rice cooker", "backpack", "monitor", "toaster", "headphones"]
PLACES = ["my office on Pine Street", "my flat on Elm Road", "the depot in Leeds", "my parents' house"]
ISSUES = ["arrived cracked", "is missing a part", "stopped working", "came in the wrong colour"]


def scripted_conversation(turns: int) -> list[dict]:
    """``2 * turns`` messages, user and assistant alternating, deterministic and varied."""
    messages = []
    for i in range(turns):
        product, place, issue = PRODUCTS[i % 8], PLACES[(i // 2) % 4], ISSUES[(i // 3) % 4]
        order = 4000 + 37 * i
        messages.append(
            {"role": "user", "content": f"Order {order}: the {product} {issue}. Please send a replacement to {place}."}
        )
        messages.append(
            {
                "role": "assistant",
                "content": f"Noted: order {order}, {product} that {issue}. A replacement goes to {place} within "
                f"{2 + i % 5} days.",
            }
        )
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str, device) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _crop_to(cache, length: int) -> None:
    """Keep the first ``length`` positions of a DynamicCache (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _answer(model, cache, first_logits: torch.Tensor, tokens: int, device) -> float:
    """Greedy-decode ``tokens - 1`` more tokens after the first; returns the seconds taken."""

    def run():
        token = first_logits[:, -1:].argmax(-1)
        for _ in range(tokens - 1):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)

    seconds, _ = timed(run, device)
    return seconds


def bench_turns(
    model,
    tokenizer,
    device: torch.device,
    quick: bool = False,
    turns: int | None = None,
    answer_tokens: int | None = None,
    window: int = 4,
    replay_every: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run the conversation on all three sides, turn by turn, rotating which side goes first.

    Args:
        model: the plain backbone (left unchanged; δ-mem runs on a copy with TSW memory attached).
        window: messages of recent history in the δ-mem prompt (besides the system and new user message).
        replay_every: measure stateless replay only every n-th turn (and the first and last): it is stateless,
            so skipping turns changes nothing else; the other two sides run every turn.

    Returns:
        ``(per_turn, summary)``: one dict per turn, and summary rows (the last turn, totals, sizes).
    """
    turns = turns or (6 if quick else 50)
    answer_tokens = answer_tokens or (4 if quick else 16)
    replay_every = replay_every or 1
    script = scripted_conversation(turns)
    system = [{"role": "system", "content": SYSTEM}]
    memory_model = attach_memory(copy.deepcopy(model), DeltaMemConfig())
    engine = MemoryEngine(memory_model, tokenizer)
    reply = GenerationSettings(max_new_tokens=answer_tokens, ignore_eos=True)
    state = None
    written = 0
    kv_cache, kv_ids = DynamicCache(config=model.config), None
    per_turn = []
    with torch.no_grad():
        warm = _ids(tokenizer, _render(tokenizer, system + script[:1], True), device)
        for warm_model, warm_cache in (
            (model, DynamicCache(config=model.config)),
            (memory_model, new_cache(memory_model)),
        ):
            _answer(warm_model, warm_cache, warm_model(warm, cache=warm_cache).logits, 2, device)  # warm-up
        for turn in range(1, turns + 1):
            history, user = script[: 2 * (turn - 1)], script[2 * (turn - 1)]
            full_prompt = _ids(tokenizer, _render(tokenizer, system + history + [user], True), device)
            row = {"turn": turn, "replay_prompt_tokens": full_prompt.shape[1]}

            def replay(full_prompt=full_prompt, row=row):
                cache = DynamicCache(config=model.config)
                ttft, logits = timed(lambda: model(full_prompt, cache=cache).logits, device)  # noqa: B023
                decode = _answer(model, cache, logits, answer_tokens, device)
                row.update(replay_ttft_s=ttft, replay_latency_s=ttft + decode, replay_kv_bytes=kv_cache_bytes(cache))

            def kept_kv(full_prompt=full_prompt, row=row):
                nonlocal kv_cache, kv_ids
                shared = 0
                if kv_ids is not None:
                    limit = min(kv_ids.shape[1], full_prompt.shape[1])
                    same = (kv_ids[0, :limit] == full_prompt[0, :limit]).int()
                    shared = int(same.cumprod(0).sum())
                    shared = min(shared, full_prompt.shape[1] - 1)  # feed at least one token
                    _crop_to(kv_cache, shared)
                new = full_prompt[:, shared:]
                ttft, logits = timed(lambda: model(new, cache=kv_cache).logits, device)
                held = kv_cache_bytes(kv_cache)
                decode = _answer(model, kv_cache, logits, answer_tokens, device)
                _crop_to(
                    kv_cache, full_prompt.shape[1]
                )  # drop the generated answer; the scripted reply comes next turn
                kv_ids = full_prompt
                row.update(kv_new_tokens=new.shape[1], kv_ttft_s=ttft, kv_latency_s=ttft + decode, kv_bytes=held)

            def delta_mem(history=history, user=user, row=row):
                nonlocal state, written
                write_s, write_tokens = 0.0, 0
                if written < len(history):  # the chat's write path: the messages not yet in memory
                    new = history[written:]
                    write_s, (state, write_tokens) = timed(lambda: engine.write(state, new), device)  # noqa: B023
                    written = len(history)
                recent = history[-window:] if window else []
                prompt = engine.render_prompt(build_read_prompt([SYSTEM], [], [*recent, user]))  # the chat's prompt
                events = engine.stream(state, prompt, reply)  # the chat's decoder (writes off)
                read_s, first = timed(lambda: next(events), device)  # noqa: B023
                decode, _ = timed(lambda: list(events), device)  # noqa: B023
                row.update(
                    mem_write_tokens=write_tokens,
                    mem_prompt_tokens=int(prompt.shape[0]),
                    mem_write_s=write_s,
                    mem_read_s=read_s,
                    mem_ttft_s=write_s + read_s,
                    mem_latency_s=write_s + read_s + decode,
                    state_bytes=len(state.to_bytes()) if state is not None else 0,
                )

            sides = [kept_kv, delta_mem]
            if turn == 1 or turn == turns or turn % replay_every == 0:
                sides.append(replay)
            shift = turn % len(sides)
            for side in sides[shift:] + sides[:shift]:
                side()
            per_turn.append(row)
            print(
                f"  turn {turn:3d}: replay {row['replay_prompt_tokens']:5d} tok"
                + (f" ttft {row['replay_ttft_s'] * 1e3:8.1f} ms" if "replay_ttft_s" in row else " (not timed)")
                + f" | kept KV +{row['kv_new_tokens']:4d} tok ttft {row['kv_ttft_s'] * 1e3:7.1f} ms"
                f" | δ-mem write {row['mem_write_tokens']:4d} + prompt {row['mem_prompt_tokens']:4d} tok"
                f" ttft {row['mem_ttft_s'] * 1e3:7.1f} ms",
                flush=True,
            )
    last = per_turn[-1]
    summary = [
        {
            "turns": turns,
            "answer_tokens": answer_tokens,
            "window_messages": window,
            "last_turn_replay_prompt_tokens": last["replay_prompt_tokens"],
            "last_turn_mem_prompt_tokens": last["mem_prompt_tokens"],
            "last_turn_replay_ttft_s": last["replay_ttft_s"],
            "last_turn_kv_ttft_s": last["kv_ttft_s"],
            "last_turn_mem_ttft_s": last["mem_ttft_s"],
            "ttft_ratio_replay_over_mem": last["replay_ttft_s"] / last["mem_ttft_s"],
            "ttft_ratio_kv_over_mem": last["kv_ttft_s"] / last["mem_ttft_s"],
            "last_turn_replay_latency_s": last["replay_latency_s"],
            "last_turn_mem_latency_s": last["mem_latency_s"],
            "state_bytes": last["state_bytes"],
            "kv_bytes_of_history": last["kv_bytes"],
            "kv_over_state": last["kv_bytes"] / max(last["state_bytes"], 1),
        }
    ]
    return per_turn, summary
