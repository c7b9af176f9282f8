"""``deltamem train``: command-line front end of :func:`deltamem_agents.train.trainer.train`."""

import argparse
import json
import os


def add_train_parser(commands) -> None:
    """Register the ``train`` subcommand."""
    p = commands.add_parser("train", help="train a δ-mem adapter (resumable)")
    p.add_argument("--backbone", default="smollm2-135m-instruct")
    p.add_argument("--data", help="JSONL episode file (default: synthetic episodes with a curriculum)")
    p.add_argument("--out", help="also export the final adapter (weights + config only) to this folder")
    p.add_argument("--checkpoint-dir", help="resumable checkpoint folder (overwritten in place)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir if it holds a checkpoint")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--curriculum", default="0:0.3,1:0.4,2:0.3", help="level:fraction,... (levels 0-3)")
    p.add_argument("--write", choices=["token", "segment", "multi"], default="token")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--forget-gate", choices=["tied", "separate"], default="separate")
    p.add_argument("--beta-bias-init", type=float, default=-2.0)
    p.add_argument("--lambda-bias-init", type=float, default=6.0)
    p.add_argument("--correction-gain", type=float, default=0.05, help="base-slice init gain of the corrections")
    p.add_argument("--contrastive", type=float, default=0.5, help="weight of the right-vs-wrong-memory margin term")
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--gate-weight", type=float, default=0.01)
    p.add_argument("--full-backprop", action="store_true", help="backpropagate through the backbone's write pass")
    p.add_argument("--max-write-tokens", type=int, default=1024)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (pin the process with taskset too)")
    p.add_argument("--dev-episodes", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace) -> int:
    from deltamem_agents.core.config import DeltaMemConfig
    from deltamem_agents.train.trainer import TrainConfig, export_adapter, train

    curriculum = []
    for part in args.curriculum.split(","):
        level, fraction = part.split(":")
        curriculum.append((int(level), float(fraction)))
    memory = DeltaMemConfig(
        rank=args.rank,
        write=args.write,
        forget_gate=args.forget_gate,
        beta_bias_init=args.beta_bias_init,
        lambda_bias_init=args.lambda_bias_init if args.forget_gate == "separate" else None,
        correction_gain=args.correction_gain,
    )
    config = TrainConfig(
        memory=memory,
        backbone=args.backbone,
        data=args.data,
        split_seed=args.split_seed,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        accumulation=args.accumulation,
        lr=args.lr,
        warmup=args.warmup,
        clip=args.clip,
        curriculum=curriculum,
        detach_backbone=not args.full_backprop,
        gate_weight=args.gate_weight,
        contrastive_weight=args.contrastive,
        margin=args.margin,
        max_write_tokens=args.max_write_tokens,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_minutes=args.checkpoint_minutes,
        dev_episodes=args.dev_episodes,
        progress=not args.no_progress and os.environ.get("RANK", "0") == "0",
    )
    import torch

    from deltamem_agents.models.backbone_zoo import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process under accelerate launch
    model, tokenizer = load_backbone(args.backbone, device=device, dtype=dtype)
    state = train(config, model=model, tokenizer=tokenizer, resume=args.resume)
    last = state["history"][-1] if state["history"] else {}
    print(json.dumps({"step": state["step"], "last": last, "dev": state.get("dev")}, indent=1))
    if args.out:
        export_adapter(model, args.out, state)
    return 0
