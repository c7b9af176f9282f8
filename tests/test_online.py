"""The online property: feeding a sequence in pieces through the cache equals one forward; generate() equals a
manual step loop; padding neither reads nor writes; concurrent caches never share memory."""

import threading

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, randomize_memory, tiny_model

from deltamem_agents import DeltaMemConfig, MemoryStateError, attach_memory, memory_state_of, new_cache


def memory_model(family, write="token", seed=0):
    model = tiny_model(family, seed=seed)
    attach_memory(model, DeltaMemConfig(write=write, chunk_size=8))
    randomize_memory(model, seed=seed + 1)
    return model


def tokens(batch=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("write", ["token", "multi"])
def test_pieces_through_the_cache_equal_one_forward(family, write):
    model = memory_model(family, write)
    ids = tokens(length=30)
    with torch.no_grad():
        whole_cache = new_cache(model)
        whole = model(ids, cache=whole_cache).logits
        piece_cache = new_cache(model)
        pieces = [model(ids[:, a:b], cache=piece_cache).logits for a, b in [(0, 11), (11, 12), (12, 25), (25, 30)]]
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-5)
    assert torch.allclose(piece_cache.memory_state().tensor, whole_cache.memory_state().tensor, atol=1e-5)
    assert not whole_cache.memory_state().is_zero()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("write", ["token", "multi"])
def test_greedy_generate_equals_a_manual_step_loop(family, write):
    model = memory_model(family, write)
    ids = tokens(batch=1, length=12)
    with torch.no_grad():
        gen_cache = new_cache(model)
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=gen_cache,
            max_new_tokens=8,
            do_sample=False,
            min_new_tokens=8,
            pad_token_id=0,
        )[0, 12:]
        loop_cache = new_cache(model)
        logits = model(ids, cache=loop_cache).logits
        manual = []
        for step in range(8):
            token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            manual.append(token.item())
            if step == 7:
                break  # generate() never feeds its last token back
            logits = model(token, cache=loop_cache).logits
    assert generated.tolist() == manual
    assert torch.allclose(memory_state_of(gen_cache, model).tensor, loop_cache.memory_state().tensor, atol=1e-5)


def test_generate_carries_a_given_state_and_returns_the_new_one():
    model = memory_model("llama")
    ids = tokens(batch=1, length=10)
    with torch.no_grad():
        first = new_cache(model)
        model(ids, cache=first)
        state = first.memory_state()
        out_a = model.generate(ids, cache=new_cache(model, state), max_new_tokens=5, do_sample=False, pad_token_id=0)
        out_b = model.generate(ids, cache=new_cache(model), max_new_tokens=5, do_sample=False, pad_token_id=0)
        logits_with = model(ids, cache=new_cache(model, state, writes=False)).logits
        logits_without = model(ids, cache=new_cache(model, writes=False)).logits
    assert not torch.allclose(logits_with, logits_without)
    assert out_a.shape == out_b.shape


def test_writes_off_reads_the_given_state_and_leaves_it_unchanged():
    model = memory_model("llama")
    ids = tokens(batch=1, length=10)
    with torch.no_grad():
        cache = new_cache(model)
        model(ids, cache=cache)
        state = cache.memory_state()
        frozen = new_cache(model, state, writes=False)
        model(tokens(batch=1, length=7, seed=5), cache=frozen)
    assert frozen.memory_state().equal(state)


def test_padding_neither_reads_nor_writes():
    model = memory_model("llama")
    ids = tokens(batch=1, length=9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone_cache = new_cache(model)
        alone = model(ids, cache=alone_cache).logits
        padded_cache = new_cache(model)
        got = model(padded, attention_mask=mask, position_ids=positions, cache=padded_cache).logits[:, 4:]
    assert torch.allclose(got, alone, atol=1e-5)
    assert torch.allclose(padded_cache.memory_state().tensor, alone_cache.memory_state().tensor, atol=1e-5)


def test_concurrent_generations_on_one_model_keep_their_own_memory():
    model = memory_model("llama")
    prompts = [tokens(batch=1, length=16, seed=s) for s in range(6)]
    with torch.no_grad():
        alone = []
        for ids in prompts:
            cache = new_cache(model)
            model(ids, cache=cache)
            alone.append(cache.memory_state())
    results = [None] * len(prompts)

    def worker(i):
        with torch.no_grad():
            for _ in range(3):
                cache = new_cache(model)
                model(prompts[i], cache=cache)
            results[i] = cache.memory_state()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for expected, got in zip(alone, results):
        assert torch.allclose(got.tensor, expected.tensor, atol=1e-6)


def test_a_state_from_another_adapter_is_refused():
    model_a, model_b = memory_model("llama", seed=0), memory_model("llama", seed=7)
    with torch.no_grad():
        cache = new_cache(model_a)
        model_a(tokens(batch=1), cache=cache)
    with pytest.raises(MemoryStateError, match="written by adapter"):
        new_cache(model_b, cache.memory_state())
