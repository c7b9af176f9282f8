"""The cached SSW write pass against the exact one (objective.write_pass, the naive reference), in fp32:
equal where the layer inputs do not depend on the memory, measurably different where they do."""

import torch
from test_train_recall import letter_episodes
from tiny_chat import char_tokenizer
from tiny_models import randomize_memory, tiny_model

from deltamem_agents import DeltaMemConfig, attach_memory, memory_parameters
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.episodes import Episode, Question, Session
from deltamem_agents.train.objective import answer_losses, write_pass
from deltamem_agents.train.write_cache import MessageInputCache, cached_write_pass


def setup(seed=0):
    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=seed)
    attach_memory(model, DeltaMemConfig(write="segment", forget_gate="separate", lambda_bias_init=3.0))
    randomize_memory(model, seed=seed + 1)
    return model, tokenizer


def multi_message_episodes(count):
    episodes = []
    for i in range(count):
        msgs = [{"role": "user", "content": f"k={'abcdefgh'[i % 8]}"}, {"role": "assistant", "content": "ok"}]
        msgs += [{"role": "user", "content": "hi there" * (1 + i % 3)}, {"role": "assistant", "content": "yes"}]
        episodes.append(
            Episode(f"m{i}", (Session(tuple(msgs)),), (Question("k?", "abcdefgh"[i % 8], evidence=((0, 0),)),))
        )
    return episodes


def both_passes(model, tokenizer, episodes):
    """(exact states, exact grads, cached states, cached grads) of the right-memory answer CE."""
    examples = [encode_example(tokenizer, e, 0, system_prompt="m") for e in episodes]
    batch = collate(examples, pad_id=0)
    params = list(memory_parameters(model).values())
    cache = MessageInputCache()
    cache.fill(model, examples)
    out = []
    for exact in (True, False):
        if exact:
            states, _ = write_pass(model, batch, detach_backbone=True)
        else:
            states, _ = cached_write_pass(model, *cache.stack(examples, "cpu"))
        loss = answer_losses(model, batch, states).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        out += [[s.detach() for s in states], flat, float(loss.detach())]
    return out


def test_first_call_from_the_empty_state_is_exact():
    model, tokenizer = setup()
    episodes = [  # one written message each: the only call starts from the empty state
        Episode(f"e{i}", (Session(({"role": "user", "content": f"k={c}"},)),), (Question("k?", c),))
        for i, c in enumerate("abcd")
    ]
    exact, g_exact, loss_exact, cached, g_cached, loss_cached = both_passes(model, tokenizer, episodes)
    for a, b in zip(exact, cached):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert float(a.abs().max()) > 0  # something was written
    assert abs(loss_exact - loss_cached) < 1e-5
    torch.testing.assert_close(g_exact, g_cached, rtol=1e-4, atol=1e-6)


def test_later_calls_are_exact_when_the_corrections_are_zero_and_approximate_otherwise():
    model, tokenizer = setup()
    episodes = multi_message_episodes(4)
    exact, _, _, cached, _, _ = both_passes(model, tokenizer, episodes)
    assert max(float((a - b).abs().max()) for a, b in zip(exact, cached)) > 1e-4  # reads moved later inputs
    with torch.no_grad():
        for name, param in memory_parameters(model).items():
            if ".delta_" in name:
                param.zero_()  # reads no longer change any layer input
    exact, g_exact, _, cached, g_cached, _ = both_passes(model, tokenizer, episodes)
    for a, b in zip(exact, cached):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_exact, g_cached, rtol=1e-4, atol=1e-6)


def test_cache_is_keyed_by_message_and_rejects_token_writes():
    model, tokenizer = setup()
    examples = [encode_example(tokenizer, e, 0, system_prompt="m") for e in letter_episodes(16, seed=None)]
    cache = MessageInputCache()
    cache.fill(model, examples)
    assert cache.built == len({MessageInputCache.key(p) for e in examples for p in e.write_pieces}) < 2 * 16
    cache.fill(model, examples)
    assert cache.built == len(cache.means)  # nothing recomputed
    token_model = tiny_model("llama")
    attach_memory(token_model, DeltaMemConfig(write="token"))
    try:
        MessageInputCache().fill(token_model, examples)
    except ValueError as err:
        assert "SSW" in str(err)
    else:
        raise AssertionError("a token-write model must be refused")


def test_trainer_with_the_cache_and_the_chat_read_prompt_records_the_cost_split(tmp_path):
    from deltamem_agents.train.episodes import save_episodes
    from deltamem_agents.train.trainer import TrainConfig, train

    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=0)
    data = save_episodes(multi_message_episodes(1) * 2, tmp_path / "train.jsonl")  # every batch the same
    config = TrainConfig(
        memory=DeltaMemConfig(write="segment"),
        data=str(data),
        steps=3,
        batch_size=2,
        system_prompt="m",
        write_cache=True,
        read_window=2,
        read_notes=1.0,
        dev_episodes=0,
        progress=False,
    )
    state = train(config, model=model, tokenizer=tokenizer)
    for record in state["history"]:
        assert record["write_s"] > 0 and record["read_s"] > 0 and record["backward_s"] > 0
        assert torch.isfinite(torch.tensor(record["loss"]))
    assert state["history"][0]["cache_s"] > 0 and state["history"][-1]["cache_s"] == 0  # built once
    example = encode_example(tokenizer, multi_message_episodes(1)[0], 0, system_prompt="m", window=2, notes=True)
    prompt = tokenizer.decode(example.read_ids[example.labels == -100])
    assert "hi there" in prompt and "k=a" in prompt  # window message and the BM25 note of the fact
