"""Training cost per episode, split into its parts, for the exact write pass and the cached one, in ONE run on
the same batches; plus how far the cached approximation is from the exact pass (loss and gradient cosine).

Usage (one core, the embedded backbone):
    taskset -c 1 python scripts/training_cost.py --data closed.jsonl --batches 6 --batch-size 8 --threads 1 \
        [--adapter runs/NAME] [--epochs 3]

Parts: write pass (forward; the exact one runs the backbone over every message, the cached one only the r x r
recurrence), read pass with the right and the wrong memory (forward), backward (of the whole loss), cache
building (the backbone over each message not cached yet, from the empty state; amortised over ``--epochs``
passes over the data, since the cache is reused; messages repeated across episodes are built once). There is no
teacher pass in this objective. The loss is the trainer's (``batch_loss``: CE + gate + contrastive).
"""

import argparse
import json
import platform
import time

import torch

from deltamem_agents import DeltaMemConfig, attach_memory, memory_parameters
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import load_backbone
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.episodes import load_episodes
from deltamem_agents.train.objective import batch_loss
from deltamem_agents.train.write_cache import MessageInputCache

RESEARCH_MEMORY = DeltaMemConfig(
    write="segment", forget_gate="separate", beta_bias_init=-1.0, lambda_bias_init=5.0, correction_gain=0.5
)


def measure(model, batch, cached, params) -> dict:
    """One batch: loss parts' timings, backward time and the flat gradient."""
    parts = batch_loss(model, batch, detach_backbone=True, contrastive_weight=1.0, margin=1.0, cached=cached)
    tick = time.perf_counter()
    grads = torch.autograd.grad(parts.loss, params, allow_unused=True)
    backward = time.perf_counter() - tick
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return {
        "write": parts.write_seconds,
        "read": parts.read_seconds,
        "backward": backward,
        "loss": float(parts.loss.detach()),
        "grad": flat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="JSONL episodes (e.g. scripts/closed_facts_episodes.py)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the data the cache is amortised over")
    parser.add_argument("--adapter", help="measure at this trained adapter (default: a fresh RESEARCH.md init)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone(DEFAULT_BACKBONE)
    if args.adapter:
        from deltamem_agents.core.adapter import load_adapter

        load_adapter(model, args.adapter)
    else:
        torch.manual_seed(0)
        attach_memory(model, RESEARCH_MEMORY)
    params = list(memory_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    episodes = load_episodes(args.data)[: args.batches * args.batch_size]
    examples = [encode_example(tokenizer, e, 0, max_write_tokens=1024) for e in episodes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache = MessageInputCache()
    totals = {mode: {"write": 0.0, "read": 0.0, "backward": 0.0} for mode in ("exact", "cached")}
    cosines, loss_gaps = [], []
    for start in range(0, len(examples), args.batch_size):
        group = examples[start : start + args.batch_size]
        batch = collate(group, pad)
        exact = measure(model, batch, None, params)
        cache.fill(model, group, pad)
        cached = measure(model, batch, cache.stack(group, "cpu"), params)
        for mode, result in (("exact", exact), ("cached", cached)):
            for part in totals[mode]:
                totals[mode][part] += result[part]
        cosines.append(float(torch.nn.functional.cosine_similarity(exact["grad"], cached["grad"], dim=0)))
        loss_gaps.append(abs(exact["loss"] - cached["loss"]))
    n = len(examples)
    pieces = sum(len(e.write_pieces) for e in examples)
    per = {mode: {part: 1000 * v / n for part, v in parts.items()} for mode, parts in totals.items()}
    per["exact"]["cache build (amortised)"] = 0.0
    per["cached"]["cache build (amortised)"] = 1000 * cache.seconds / n / args.epochs
    for mode in per:
        per[mode]["teacher"] = 0.0
        per[mode]["total"] = sum(v for k, v in per[mode].items() if k != "total")
    result = {
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
        "episodes": n,
        "batch_size": args.batch_size,
        "write_pieces": pieces,
        "unique_pieces_built": cache.built,
        "epochs_amortised": args.epochs,
        "adapter": args.adapter or "fresh init (RESEARCH.md memory config)",
        "ms_per_episode": per,
        "write_speedup": per["exact"]["write"] / max(per["cached"]["write"], 1e-9),
        "write_plus_cache_speedup": per["exact"]["write"]
        / max(per["cached"]["write"] + per["cached"]["cache build (amortised)"], 1e-9),
        "grad_cosine_mean": sum(cosines) / len(cosines),
        "grad_cosine_min": min(cosines),
        "abs_loss_diff_mean": sum(loss_gaps) / len(loss_gaps),
    }
    print("| part (ms per episode) | exact write pass | cached write pass |")
    print("|---|---|---|")
    for part in per["exact"]:
        print(f"| {part} | {per['exact'][part]:.1f} | {per['cached'][part]:.1f} |")
    print(json.dumps({k: v for k, v in result.items() if k != "ms_per_episode"}, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
