"""Training on a tiny model: on a task that cannot be solved without memory (the answer is a random letter stated
only in the history), the answer loss with the right memory falls below the loss with another conversation's
memory."""

import random

import torch
from tiny_chat import char_tokenizer
from tiny_models import tiny_model

from deltamem_agents import DeltaMemConfig, attach_memory
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.episodes import Episode, Question, Session, save_episodes
from deltamem_agents.train.objective import answer_losses, write_pass
from deltamem_agents.train.trainer import TrainConfig, train

LETTERS = "abcdefgh"


def letter_episodes(count: int, seed: int | None) -> list[Episode]:
    """Random letters, or with ``seed=None`` the letters in turn (neighbours always differ)."""
    rng = random.Random(seed)
    episodes = []
    for i in range(count):
        letter = rng.choice(LETTERS) if seed is not None else LETTERS[i % len(LETTERS)]
        messages = ({"role": "user", "content": f"k={letter}"}, {"role": "assistant", "content": "ok"})
        episodes.append(
            Episode(id=f"e{i}", sessions=(Session(messages),), questions=(Question("k?", letter, evidence=((0, 0),)),))
        )
    return episodes


def memory_gap(model, tokenizer, episodes) -> tuple[float, float]:
    examples = [encode_example(tokenizer, e, 0, system_prompt="m") for e in episodes]
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        states, _ = write_pass(model, batch, detach_backbone=True)
        right = answer_losses(model, batch, states).mean().item()
        wrong = answer_losses(model, batch, [s.roll(1, dims=0) for s in states]).mean().item()
    return right, wrong


def test_right_memory_beats_wrong_memory_after_training(tmp_path):
    tokenizer = char_tokenizer()
    data = save_episodes(letter_episodes(256, seed=0), tmp_path / "train.jsonl")
    model = tiny_model("llama", seed=0)
    memory = DeltaMemConfig(forget_gate="separate", beta_bias_init=0.0, lambda_bias_init=4.0)
    torch.manual_seed(0)
    attach_memory(model, memory)
    held_out = letter_episodes(32, seed=None)  # "wrong" (the neighbour's memory) is really wrong
    right0, wrong0 = memory_gap(model, tokenizer, held_out)
    config = TrainConfig(
        memory=memory,
        data=str(data),
        steps=150,
        batch_size=8,
        lr=1e-2,
        warmup=0.05,
        contrastive_weight=0.5,
        system_prompt="m",
        dev_episodes=0,
        progress=False,
    )
    state = train(config, model=model, tokenizer=tokenizer)
    right, wrong = memory_gap(model, tokenizer, held_out)
    assert abs(wrong0 - right0) < 0.05  # before training the memory carries nothing
    assert right < wrong - 0.2, (right, wrong, state["history"][-1])
    assert right < right0 - 0.3
