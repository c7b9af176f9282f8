"""``deltamem train``: command-line front end of :func:`deltamem_agents.train.trainer.train`.

Every default comes from ``TrainConfig()`` (and its ``DeltaMemConfig()``), or from the recipe named with
``--recipe``; a flag given on the command line overrides it. So ``deltamem train`` and ``train(TrainConfig())``
make the same adapter.
"""

import argparse
import json
import os

from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.train.trainer import TrainConfig

TRAIN = TrainConfig()
MEMORY = DeltaMemConfig()

# flag -> (TrainConfig field, type, help); memory fields are "memory.<field>"
FLAGS = {
    "backbone": ("backbone", str, "backbone name or folder (see load_backbone)"),
    "data": ("data", str, "JSONL episode file (default: synthetic episodes with a curriculum)"),
    "checkpoint-dir": ("checkpoint_dir", str, "resumable checkpoint folder, outside the package (e.g. runs/NAME)"),
    "checkpoint-minutes": ("checkpoint_minutes", float, "minutes between checkpoints"),
    "steps": ("steps", int, "optimizer steps"),
    "batch-size": ("batch_size", int, "episodes per micro-batch"),
    "accumulation": ("accumulation", int, "micro-batches per optimizer step"),
    "lr": ("lr", float, "peak learning rate (AdamW, warm-up then cosine)"),
    "warmup": ("warmup", float, "fraction of the steps spent warming up"),
    "clip": ("clip", float, "gradient-norm clip"),
    "seed": ("seed", int, "seed of the data order and the synthetic episodes"),
    "split-seed": ("split_seed", int, "seed of the synthetic train/dev/test split"),
    "contrastive": ("contrastive_weight", float, "weight of the right-vs-wrong-memory margin term"),
    "margin": ("margin", float, "margin of the contrastive term, in nats"),
    "first-token-weight": ("first_token_weight", float, "weight of each answer's first token in its CE (1 = mean)"),
    "gate-weight": ("gate_weight", float, "weight of the write-gate regulariser"),
    "max-write-tokens": ("max_write_tokens", int, "longest history written (oldest messages dropped)"),
    "dtype": ("dtype", str, "float32 or bfloat16"),
    "device": ("device", str, "torch device (default: CUDA when present, else CPU)"),
    "threads": ("threads", int, "torch threads (pin the process with taskset too)"),
    "dev-episodes": ("dev_episodes", int, "dev episodes evaluated at the end"),
    "read-window": ("read_window", int, "last history messages in the read prompt (the chat's window)"),
    "read-notes": ("read_notes", float, "share of examples with BM25 notes of older messages in the read prompt"),
    "write-cache-until": ("write_cache_until", float, "with --write-cache: share of the steps that use it"),
    "distill": ("distill_weight", float, "weight of the context-distillation KL (teacher: backbone + the fact)"),
    "distill-top-k": ("distill_top_k", int, "the teacher's top-k tokens (>= 64, renormalised) of the KL"),
    "prompt-weight": ("prompt_weight", float, "weight of CE(wrong memory) where the prompt holds the answer"),
    "write": ("memory.write", str, "write strategy: token (TSW), segment (SSW) or multi (MSW)"),
    "rank": ("memory.rank", int, "r, the side of each memory state"),
    "forget-gate": ("memory.forget_gate", str, "tied (lambda = 1 - beta, the paper) or separate"),
    "beta-bias-init": ("memory.beta_bias_init", float, "initial write-gate bias"),
    "lambda-bias-init": ("memory.lambda_bias_init", float, "initial bias of the separate forget gate"),
    "correction-gain": ("memory.correction_gain", float, "base-slice init gain of the corrections"),
}
CHOICES = {
    "write": ["token", "segment", "multi"],
    "forget-gate": ["tied", "separate"],
    "dtype": ["float32", "bfloat16"],
}


def _default(field: str, base: TrainConfig = TRAIN):
    if field.startswith("memory."):
        return getattr(base.memory, field.split(".", 1)[1])
    return getattr(base, field)


def add_train_parser(commands) -> None:
    """Register the ``train`` subcommand."""
    from deltamem_agents.train.recipes import RECIPES

    p = commands.add_parser(
        "train",
        help="train a δ-mem adapter (resumable)",
        description="Train a δ-mem adapter on the frozen backbone. Defaults: TrainConfig() and DeltaMemConfig() "
        "(shown below), or the recipe given with --recipe; flags override either.",
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), help="start from a named recipe instead of TrainConfig()")
    for flag, (field, kind, text) in FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, choices=CHOICES.get(flag), help=f"{text} (default: {_default(field)!r})")
    p.add_argument("--curriculum", help=f"level:fraction,... (levels 0-3; default: {TRAIN.curriculum})")
    p.add_argument("--full-backprop", action="store_true", help="backpropagate through the backbone's write pass")
    p.add_argument(
        "--write-cache",
        action="store_true",
        help="SSW: write from per-message layer inputs cached with the empty memory (docs/training.md)",
    )
    p.add_argument(
        "--init-from",
        help="start from this adapter folder, or 'default' (the shipped default; while that is the identity, the "
        "run starts from the --write/... init instead)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir if it holds a checkpoint")
    p.add_argument("--out", help="also export the final adapter (weights + config only) to this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a ``deltamem train`` command line: the base (TrainConfig() or the recipe) with every
    given flag applied."""
    from deltamem_agents.train.recipes import RECIPES

    base = RECIPES[args.recipe] if getattr(args, "recipe", None) else TRAIN
    values = base.model_dump()
    memory = dict(values.pop("memory"))
    for flag, (field, _, _) in FLAGS.items():
        given = getattr(args, flag.replace("-", "_"), None)
        if given is None:
            continue
        if field.startswith("memory."):
            memory[field.split(".", 1)[1]] = given
        else:
            values[field] = given
    if memory.get("forget_gate") == "tied":
        memory["lambda_bias_init"] = None
    if getattr(args, "curriculum", None):
        values["curriculum"] = [(int(a), float(b)) for a, b in (part.split(":") for part in args.curriculum.split(","))]
    if getattr(args, "full_backprop", False):
        values["detach_backbone"] = False
    if getattr(args, "write_cache", False):
        values["write_cache"] = True
    values["progress"] = not getattr(args, "no_progress", False) and os.environ.get("RANK", "0") == "0"
    return TrainConfig(memory=DeltaMemConfig(**memory), **values)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from deltamem_agents.models.backbone_zoo import load_backbone
    from deltamem_agents.train.trainer import export_adapter, train

    config = config_from_args(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    device = config.device
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process under accelerate launch
    model, tokenizer = load_backbone(config.backbone, device=device, dtype=dtype)
    if args.init_from:
        from deltamem_agents.core.attach import detach_memory, has_memory
        from deltamem_agents.models.default_adapter import apply_adapter

        if apply_adapter(model, args.init_from, config.backbone) is None and has_memory(model):
            detach_memory(model)  # the identity has zero corrections: train from the config's init instead
            print("--init-from default: starting from the configured init")
    state = train(config, model=model, tokenizer=tokenizer, resume=args.resume)
    last = state["history"][-1] if state["history"] else {}
    print(json.dumps({"step": state["step"], "last": last, "dev": state.get("dev")}, indent=1))
    if args.out:
        export_adapter(model, args.out, state)
    return 0
