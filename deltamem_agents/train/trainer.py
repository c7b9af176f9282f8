"""The training loop: frozen backbone, δ-mem adapter, AdamW with warm-up + cosine, gradient clipping and
accumulation, length-sorted batches, a curriculum, periodic resumable checkpoints and a dev evaluation."""

import json
import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltamem_agents.core.adapter import save_adapter
from deltamem_agents.core.attach import attach_memory, has_memory, memory_parameters
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.serving.prompts import SYSTEM_PROMPT
from deltamem_agents.train.batching import Example, collate, encode_example, length_sorted_batches
from deltamem_agents.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from deltamem_agents.train.episodes import load_episodes
from deltamem_agents.train.objective import batch_loss
from deltamem_agents.train.synthetic import SyntheticEpisodes
from deltamem_agents.train.write_cache import MessageInputCache


class TrainConfig(BaseModel):
    """Everything a training run depends on (stored in the checkpoint; a resume must use the same values).

    ``curriculum`` is a list of ``(level, fraction of the steps)`` stages of synthetic episodes (see
    ``deltamem_agents.train.synthetic``); ``data`` replaces the synthetic episodes with a JSONL file.

    ``write_cache`` (SSW only) runs the write pass from per-message layer inputs cached with the empty memory
    (``deltamem_agents.train.write_cache``: exact for the first message, an approximation after it that drifts
    as the corrections grow; it implies the detached backbone) for the first ``write_cache_until`` share of the
    steps, the exact write pass after them. ``read_window`` puts the last messages of the history into the read
    prompt, and
    ``read_notes`` is the share of examples whose read prompt also holds the BM25 notes of the older messages,
    as the chat's read prompt does. Where the read prompt holds the answer the contrastive term is off and
    ``prompt_weight`` x CE(answer | wrong memory) is added instead: with another conversation's memory the model
    must still follow its prompt (do no harm). ``distill_weight`` adds context distillation (``batch_loss``):
    KL to the frozen backbone that reads the fact-holding messages in its prompt, over its top
    ``distill_top_k`` tokens renormalised; the teacher runs once per example seen, without gradients.
    ``first_token_weight`` weighs each answer's first token in its CE (and so in the margin); 1 is the mean.
    """

    model_config = ConfigDict(extra="forbid")

    memory: DeltaMemConfig = DeltaMemConfig()
    backbone: str = DEFAULT_BACKBONE
    data: str | None = None
    split_seed: int = 0
    seed: int = 0
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    accumulation: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    warmup: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    clip: float = Field(1.0, gt=0)
    curriculum: list[tuple[int, float]] = [(0, 0.3), (1, 0.4), (2, 0.3)]
    detach_backbone: bool = True
    write_cache: bool = False
    write_cache_until: float = Field(1.0, ge=0, le=1)
    read_window: int = Field(0, ge=0)
    read_notes: float = Field(0.0, ge=0, le=1)
    prompt_weight: float = Field(1.0, ge=0)
    distill_weight: float = Field(0.0, ge=0)
    distill_top_k: int = Field(64, ge=64)
    gate_weight: float = 0.01
    gate_target: float = 0.05
    contrastive_weight: float = 0.5
    margin: float = 1.0
    first_token_weight: float = Field(1.0, gt=0)
    system_prompt: str = SYSTEM_PROMPT
    max_write_tokens: int = 1024
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str | None = None
    threads: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_minutes: float = 5.0
    dev_episodes: int = 64
    dev_level: int = 1
    progress: bool = True


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine down to min_lr_ratio."""
    warm = max(1, round(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_examples(config: TrainConfig, tokenizer) -> list[list[Example]]:
    """The whole run's micro-batches in order, a pure function of the config (so a resume sees the same data).

    Each curriculum stage gets its share of the steps; inside a stage, batches are sorted by length and their
    order shuffled with the seed.
    """
    rng = random.Random(f"batches:{config.seed}")
    per_step = config.batch_size * config.accumulation
    if config.data:
        episodes = load_episodes(config.data)
        stages = [(episodes, config.steps)]
    else:
        generator = SyntheticEpisodes("train", config.split_seed)
        total = sum(f for _, f in config.curriculum)
        stages, used = [], 0
        for i, (level, fraction) in enumerate(config.curriculum):
            steps = config.steps - used if i == len(config.curriculum) - 1 else round(config.steps * fraction / total)
            used += steps
            stages.append((generator.episodes(steps * per_step, level, seed=config.seed * 1000 + i), steps))
    batches = []
    for episodes, steps in stages:
        examples = []
        for episode in episodes:
            q = rng.randrange(len(episode.questions))
            examples.append(
                encode_example(
                    tokenizer,
                    episode,
                    q,
                    config.system_prompt,
                    config.max_write_tokens,
                    window=config.read_window,
                    notes=config.read_notes > 0 and rng.random() < config.read_notes,
                    teacher=config.distill_weight > 0,
                )
            )
        while len(examples) < steps * per_step:  # a small data file is repeated
            examples += examples[: steps * per_step - len(examples)]
        groups = length_sorted_batches(examples[: steps * per_step], config.batch_size, rng)
        batches += groups
    return batches


def train(config: TrainConfig, model=None, tokenizer=None, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train (or resume training) a δ-mem adapter.

    Args:
        config: the run's settings.
        model, tokenizer: a loaded backbone (default: ``load_backbone(config.backbone)``); memory is attached with
            ``config.memory`` if the model has none.
        resume: continue from ``config.checkpoint_dir`` if it holds a checkpoint (else start fresh).
        stop_after: stop after this optimizer step (simulates a kill; the checkpoint is written first).

    Returns:
        The trainer state: ``step``, ``history`` (per-step metrics), ``dev`` (dev metrics when finished).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    if model is None:
        from deltamem_agents.models.backbone_zoo import load_backbone

        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
        model, tokenizer = load_backbone(config.backbone, device=config.device, dtype=dtype)
    if not has_memory(model):
        attach_memory(model, config.memory)
    device = next(model.parameters()).device
    rank, world = _distributed()
    if config.accumulation % world:
        raise ValueError(f"accumulation ({config.accumulation}) must be a multiple of the {world} processes")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    params = list(memory_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = training_examples(config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    state = {"step": 0, "history": [], "config": config.model_dump(mode="json"), "seconds": 0.0}
    if resume and config.checkpoint_dir and has_checkpoint(config.checkpoint_dir):
        saved = load_checkpoint(config.checkpoint_dir, model, optimizer)
        if saved["config"] != state["config"]:
            changed = sorted(k for k in state["config"] if state["config"][k] != saved["config"].get(k))
            if set(changed) - {"progress", "threads", "checkpoint_minutes", "device"}:
                raise ValueError(f"resume with a different config: {changed} differ from the checkpoint")
        state = {**saved, "config": state["config"]}
    cache = MessageInputCache() if config.write_cache else None
    bar = _progress(config, state["step"])
    last_save, started = time.monotonic(), time.monotonic()
    seconds_before = state["seconds"]
    model.train()
    try:
        while state["step"] < config.steps:
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step)
            optimizer.zero_grad(set_to_none=True)
            tick, tokens, parts_list = time.monotonic(), 0, []
            cache_seconds, backward_seconds = 0.0, 0.0
            for micro in range(rank, config.accumulation, world):
                examples = batches[step * config.accumulation + micro]
                batch = collate(examples, pad).to(device)
                cached = None
                if cache is not None and step < config.write_cache_until * config.steps:
                    before = cache.seconds
                    cache.fill(model, examples, pad)
                    cache_seconds += cache.seconds - before
                    cached = cache.stack(examples, device)
                parts = batch_loss(
                    model,
                    batch,
                    detach_backbone=config.detach_backbone,
                    gate_weight=config.gate_weight,
                    gate_target=config.gate_target,
                    contrastive_weight=config.contrastive_weight,
                    margin=config.margin,
                    prompt_weight=config.prompt_weight,
                    distill_weight=config.distill_weight,
                    distill_top_k=config.distill_top_k,
                    first_weight=config.first_token_weight,
                    cached=cached,
                )
                backward_tick = time.monotonic()
                (parts.loss / config.accumulation).backward()
                backward_seconds += time.monotonic() - backward_tick
                tokens += batch.tokens
                parts_list.append(parts)
            if world > 1:
                _sum_gradients(params)  # each rank did its share of the accumulation micro-batches
            norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            elapsed = time.monotonic() - tick
            gaps = [p.gap for p in parts_list if p.gap is not None]
            record = {
                "step": step + 1,
                "loss": sum(float(p.loss.detach()) for p in parts_list) / len(parts_list),
                "ce": sum(p.ce for p in parts_list) / len(parts_list),
                "gap": sum(gaps) / len(gaps) if gaps else None,
                "beta": sum(p.beta_mean for p in parts_list) / len(parts_list),
                "grad_norm": float(norm),
                "lr": lr_at(config, step),
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "seconds": elapsed,
                "write_s": sum(p.write_seconds for p in parts_list),
                "read_s": sum(p.read_seconds for p in parts_list),
                "backward_s": backward_seconds,
                "cache_s": cache_seconds,
                "teacher_s": sum(p.teacher_seconds for p in parts_list),
                "distill": None
                if parts_list[0].distill is None
                else sum(p.distill for p in parts_list) / len(parts_list),
            }
            state["history"].append(record)
            state["step"] = step + 1
            state["seconds"] = seconds_before + time.monotonic() - started
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    gap=f"{_avg(state['history'], 'gap'):.3f}",
                    tok_s=f"{tokens / elapsed:.0f}",
                )
            due = time.monotonic() - last_save > 60 * config.checkpoint_minutes
            final = state["step"] == config.steps or state["step"] == stop_after
            if config.checkpoint_dir and rank == 0 and (due or final):
                save_checkpoint(config.checkpoint_dir, model, optimizer, state, _adapter_extra(state))
                last_save = time.monotonic()
            if stop_after is not None and state["step"] >= stop_after:
                return state
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    if config.dev_episodes and rank == 0:
        state["dev"] = dev_metrics(model, tokenizer, config)
        if config.checkpoint_dir:
            save_checkpoint(config.checkpoint_dir, model, optimizer, state, _adapter_extra(state))
    return state


@torch.no_grad()
def dev_metrics(model, tokenizer, config: TrainConfig, batch_size: int = 8) -> dict:
    """Teacher-forced answer CE with the right memory and with another conversation's memory on dev episodes,
    and the share of first answer tokens predicted correctly (argmax) with each."""
    from deltamem_agents.train.objective import answer_losses, write_pass

    episodes = SyntheticEpisodes("dev", config.split_seed).episodes(config.dev_episodes, config.dev_level, seed=1)
    examples = [encode_example(tokenizer, e, 0, config.system_prompt, config.max_write_tokens) for e in episodes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    right, wrong = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad).to(device)
        if batch.size < 2:
            continue
        states, _ = write_pass(model, batch, detach_backbone=True)
        right += answer_losses(model, batch, states).tolist()
        wrong += answer_losses(model, batch, [s.roll(1, dims=0) for s in states]).tolist()
    n = max(1, len(right))
    return {
        "episodes": len(right),
        "level": config.dev_level,
        "ce_right": sum(right) / n,
        "ce_wrong": sum(wrong) / n,
        "gap": (sum(wrong) - sum(right)) / n,
        "right_better_share": sum(r < w for r, w in zip(right, wrong)) / n,
    }


def _distributed() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` / torchrun, else (0, 1)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState()  # initialises the process group (NCCL on GPUs, gloo on CPU)
    return int(os.environ.get("RANK", "0")), world


def _sum_gradients(params) -> None:
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)


def export_adapter(model, directory, state: dict) -> Path:
    """Save only the adapter (no optimizer) with the training summary in its JSON."""
    return save_adapter(model, directory, extra=_adapter_extra(state))


def _adapter_extra(state: dict) -> dict:
    return {
        "trained_steps": state["step"],
        "train_seconds": round(state.get("seconds", 0.0), 1),
        "dev": state.get("dev"),
    }


def _avg(history: list[dict], key: str, window: int = 20) -> float:
    values = [h[key] for h in history[-window:] if h.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def _progress(config: TrainConfig, initial: int):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=initial, desc="train", dynamic_ncols=True, mininterval=2.0)


def read_state(directory) -> dict:
    """The trainer state JSON of a checkpoint folder (for reports and model cards)."""
    return json.loads((Path(directory) / "trainer_state.json").read_text())
