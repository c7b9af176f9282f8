"""Teacher-forced answer CE with the right memory and with another conversation's memory (the control) on the
closed-fact TUNE half (rung 1), read prompt = system + window of the last 2 messages + question, as the chat.

Usage: python scripts/closed_dev_ce.py ADAPTER [--limit N]   (prints one JSON line; for choosing recipes only)
"""

import argparse
import json

import torch

from deltamem_agents.core.adapter import load_adapter
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import load_backbone
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.closed_facts import closed_facts_test
from deltamem_agents.train.objective import answer_losses, write_pass

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter")
    parser.add_argument("--limit", type=int, default=25, help="conversations of the tune half")
    parser.add_argument("--window", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_backbone(DEFAULT_BACKBONE)
    load_adapter(model, args.adapter)
    episodes = closed_facts_test("tune")[: args.limit]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right, wrong = [], []
    with torch.no_grad():
        for q in range(4):
            examples = [encode_example(tokenizer, e, q, window=args.window) for e in episodes]
            for start in range(0, len(examples), 8):
                batch = collate(examples[start : start + 8], pad)
                if batch.size < 2:
                    continue
                states, _ = write_pass(model, batch, detach_backbone=True)
                right += answer_losses(model, batch, states).tolist()
                wrong += answer_losses(model, batch, [s.roll(1, dims=0) for s in states]).tolist()
    n = len(right)
    print(
        json.dumps(
            {
                "adapter": args.adapter,
                "n": n,
                "ce_right": sum(right) / n,
                "ce_wrong": sum(wrong) / n,
                "right_better_share": sum(r < w for r, w in zip(right, wrong)) / n,
            }
        )
    )
