"""Teacher-forced answer CE with the right memory and with another conversation's memory (the control) on the
closed-fact TUNE half (rung 1), read prompt = system + window of the last 2 messages + question, as the chat.

Usage: python scripts/closed_dev_ce.py ADAPTER [--limit N] [--notes]   (prints one JSON line; for choosing recipes only)
"""

import argparse
import json

import torch

from deltamem_agents.core.adapter import load_adapter
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import load_backbone
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.closed_facts import closed_facts_test
from deltamem_agents.train.objective import answer_scores, write_pass

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter")
    parser.add_argument("--limit", type=int, default=25, help="conversations of the tune half")
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--notes", action="store_true", help="BM25 notes in the read prompt; adds the empty memory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_backbone(DEFAULT_BACKBONE)
    load_adapter(model, args.adapter)
    episodes = closed_facts_test("tune")[: args.limit]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right, wrong, hit_right, hit_wrong, empty_ce, hit_empty = [], [], [], [], [], []
    with torch.no_grad():
        for q in range(4):
            examples = [encode_example(tokenizer, e, q, window=args.window, notes=args.notes) for e in episodes]
            for start in range(0, len(examples), 8):
                batch = collate(examples[start : start + 8], pad)
                if batch.size < 2:
                    continue
                states, _ = write_pass(model, batch, detach_backbone=True)
                memories = [(states, right, hit_right), ([s.roll(1, dims=0) for s in states], wrong, hit_wrong)]
                if args.notes:  # the empty memory reads 0: the backbone (the same for every adapter without notes)
                    memories.append(([torch.zeros_like(s) for s in states], empty_ce, hit_empty))
                for memory, ces, hits in memories:
                    ce, hit = answer_scores(model, batch, memory)
                    ces += ce.tolist()
                    hits += hit.tolist()
    n = len(right)
    print(
        json.dumps(
            {
                "adapter": args.adapter,
                "n": n,
                "ce_right": sum(right) / n,
                "ce_wrong": sum(wrong) / n,
                "right_better_share": sum(r < w for r, w in zip(right, wrong)) / n,
                "first_token_acc_right": sum(hit_right) / n,
                "first_token_acc_wrong": sum(hit_wrong) / n,
                "ce_empty_memory": sum(empty_ce) / n if empty_ce else None,
                "first_token_acc_empty_memory": sum(hit_empty) / n if hit_empty else None,
                "notes": args.notes,
            }
        )
    )
