"""A run stopped after step k and resumed from its checkpoint ends with the same weights (and optimizer state)
as an uninterrupted run; checkpoints hold no pickle."""

import json

import pytest
import torch
from test_train_recall import letter_episodes  # noqa: I001
from tiny_chat import char_tokenizer
from tiny_models import tiny_model

from deltamem_agents import DeltaMemConfig, attach_memory, memory_parameters
from deltamem_agents.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint
from deltamem_agents.train.episodes import save_episodes
from deltamem_agents.train.trainer import TrainConfig, lr_at, train

MEMORY = DeltaMemConfig(forget_gate="separate", beta_bias_init=-1.0, lambda_bias_init=3.0)


def fresh_model(seed: int):
    model = tiny_model("llama", seed=0)
    torch.manual_seed(seed)  # different adapter init: the resumed run must take the checkpoint's weights
    return attach_memory(model, MEMORY)


def config(tmp_path, checkpoint: str | None) -> TrainConfig:
    data = save_episodes(letter_episodes(64, seed=0), tmp_path / "train.jsonl")
    return TrainConfig(
        memory=MEMORY,
        data=str(data),
        steps=8,
        batch_size=4,
        accumulation=2,
        lr=1e-2,
        system_prompt="m",
        checkpoint_dir=checkpoint,
        checkpoint_minutes=1000.0,
        dev_episodes=0,
        progress=False,
    )


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    tokenizer = char_tokenizer()
    whole_model = fresh_model(1)
    whole = train(config(tmp_path, None), model=whole_model, tokenizer=tokenizer)

    checkpoint = str(tmp_path / "ckpt")
    first = train(config(tmp_path, checkpoint), model=fresh_model(1), tokenizer=tokenizer, stop_after=3)
    assert first["step"] == 3 and has_checkpoint(checkpoint)
    saved = json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())
    assert saved["step"] == 3 and len(saved["history"]) == 3
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "ckpt").iterdir())

    resumed_model = fresh_model(2)
    resumed = train(config(tmp_path, checkpoint), model=resumed_model, tokenizer=tokenizer, resume=True)
    assert resumed["step"] == 8
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]], abs=1e-6)
    a, b = memory_parameters(whole_model), memory_parameters(resumed_model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


def test_resume_refuses_a_different_config(tmp_path):
    tokenizer = char_tokenizer()
    checkpoint = str(tmp_path / "ckpt")
    train(config(tmp_path, checkpoint), model=fresh_model(1), tokenizer=tokenizer, stop_after=1)
    other = config(tmp_path, checkpoint).model_copy(update={"lr": 5e-3})
    with pytest.raises(ValueError, match="lr"):
        train(other, model=fresh_model(1), tokenizer=tokenizer, resume=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model = fresh_model(1)
    optimizer = torch.optim.AdamW(memory_parameters(model).values())
    with pytest.raises(CheckpointError, match="no complete training checkpoint"):
        load_checkpoint(tmp_path / "nothing", model, optimizer)


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 0.1
