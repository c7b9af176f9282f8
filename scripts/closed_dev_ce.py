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
from deltamem_agents.train.objective import answer_losses, first_token_hits, write_pass


def scores(model, batch, states):
    """Per example the answer CE and whether the first answer token is the argmax, from one read pass."""
    keep = []
    ce = answer_losses(model, batch, states, keep)  # (B,)
    logits, rows = keep[0]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # (N,) each example's first answer position
    targets = batch.labels[:, 1:][batch.labels[:, 1:] != -100]  # (N,)
    hits = torch.zeros(batch.size, dtype=torch.bool).index_copy(
        0, rows[first], logits[first].argmax(-1) == targets[first]
    )
    return ce.tolist(), hits.tolist()


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
                for (ce, hits), (ces, hit_list) in (
                    (scores(model, batch, states), (right, hit_right)),
                    (scores(model, batch, [s.roll(1, dims=0) for s in states]), (wrong, hit_wrong)),
                ):
                    ces += ce
                    hit_list += hits
                if args.notes:  # the empty memory reads 0: the backbone (the same for every adapter without notes)
                    zeros = [torch.zeros_like(s) for s in states]
                    empty_ce += answer_losses(model, batch, zeros).tolist()
                    hit_empty += first_token_hits(model, batch, zeros).tolist()
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
