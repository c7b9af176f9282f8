"""Does the written memory hold the fact, whatever the wording? A linear probe on the final δ-mem states.

For one kind of closed fact (colour: 8 values, weekday: 7, pet: 6) the probe is a multinomial logistic regression
on the standardised, flattened final states of every memory layer. It is fitted on the states of training-template
episodes (``--level 2``, the default: 1-4 facts, then small talk over 1-3 sessions; ``--level 0``: the fact is the
last message pair) and scored (a) on held-out training-template episodes and (b) on the rung-1 test set's TUNE
half (test templates, test small talk). If (b) is near chance while (a) is high, the write keys on the training
wordings; if (b) is high while the chat's answers stay at chance, the read is what fails. The states come from
the exact write pass (the chat's write schedule).

Usage: python scripts/state_probe.py ADAPTER_OR_init:ADAPTER [--kind colour] [--train 240] [--threads 1]
``init:ADAPTER`` uses ADAPTER's config with freshly initialised weights (the untrained baseline).
Prints one JSON line.
"""

import argparse
import json
import random

import torch
import torch.nn.functional as F

from deltamem_agents.core.adapter import load_adapter, read_adapter_config
from deltamem_agents.core.attach import attach_memory
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import load_backbone
from deltamem_agents.train.batching import collate, encode_example
from deltamem_agents.train.closed_facts import VALUES, ClosedFactEpisodes, closed_facts_test
from deltamem_agents.train.objective import write_pass


def states_of(model, tokenizer, episodes, pad) -> torch.Tensor:
    """The final states of every memory layer, flattened and concatenated per episode: (E, L*H*r*r)."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(episodes), 8):
            batch = collate([encode_example(tokenizer, e, 0) for e in episodes[start : start + 8]], pad)
            states, _ = write_pass(model, batch, detach_backbone=True)  # per layer (B, H, r, r)
            rows.append(torch.cat([s.flatten(1) for s in states], dim=1))  # (B, L*H*r*r)
    return torch.cat(rows)


def label_of(episode, kind: str) -> int:
    answer = next(q.answer for q in episode.questions if q.kind == kind)
    return VALUES[kind].index(answer)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 300):
    """Multinomial logistic regression (LBFGS, L2 penalty ``l2``) on standardised ``x``: returns a predictor."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda new: (((new - mean) / std) @ weight.detach() + bias.detach()).argmax(-1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter")
    parser.add_argument("--kind", default="colour", choices=sorted(VALUES))
    parser.add_argument("--train", type=int, default=240, help="training-template episodes (3/4 fit, 1/4 held out)")
    parser.add_argument("--level", type=int, default=2, help="curriculum level of the training-template episodes")
    parser.add_argument("--test", type=int, default=50, help="conversations of the rung-1 tune half (at most 50)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone(DEFAULT_BACKBONE)
    fresh = args.adapter.startswith("init:")
    directory = args.adapter.removeprefix("init:")
    if fresh:
        attach_memory(model, read_adapter_config(directory)[0])
    else:
        load_adapter(model, directory)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = ClosedFactEpisodes("train")
    pool = [
        e
        for e in generator.train_episodes(4 * args.train, args.level, seed=7)
        if any(q.kind == args.kind for q in e.questions)
    ]
    train = random.Random(0).sample(pool, min(args.train, len(pool)))
    test = closed_facts_test("tune")[: args.test]
    x_train = states_of(model, tokenizer, train, pad)
    x_test = states_of(model, tokenizer, test, pad) if test else x_train[:0]
    y_train = torch.tensor([label_of(e, args.kind) for e in train])
    y_test = torch.tensor([label_of(e, args.kind) for e in test])
    cut = 3 * len(train) // 4
    classes = len(VALUES[args.kind])
    result = {
        "adapter": args.adapter,
        "kind": args.kind,
        "level": args.level,
        "chance": 1 / classes,
        "fit": cut,
        "test": len(test),
    }
    for l2 in (1e-3, 1e-2, 1e-1):
        predict = fit_probe(x_train[:cut], y_train[:cut], classes, l2)
        result[f"l2={l2}"] = {
            "train_templates_held_out": float((predict(x_train[cut:]) == y_train[cut:]).float().mean()),
            "test_templates": float((predict(x_test) == y_test).float().mean()) if len(test) else None,
        }
    print(json.dumps(result))
