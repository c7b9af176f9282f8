"""Train the tool-choice adapter (``serving.choice_adapter``) on the generated tool sets and save it.

    python scripts/train_choice_adapter.py OUT_DIR [--steps 300 --batch-size 8 --lr 1e-3 --rank 8]

Writes OUT_DIR/choice_adapter.safetensors, choice_adapter.json (settings, data digest, command, dev accuracy)
and history.json (loss per step, dev accuracy of held-out domains). Pin it: taskset -c 1, OMP_NUM_THREADS=1.
"""

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import torch

from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.models.backbone_zoo import load_backbone
from deltamem_agents.train.choice_training import TOOL_SETS, ChoiceTrainConfig, load_tool_sets, train_choice_adapter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the adapter")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--data", default=str(TOOL_SETS), help="the tool sets (JSON)")
    defaults = ChoiceTrainConfig()
    for name in ("steps", "batch_size", "lr", "rank", "alpha", "reply_share", "dev_domains", "dev_every", "seed"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = ChoiceTrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ChoiceTrainConfig) if hasattr(args, f.name)}
    )
    model, tokenizer = load_backbone(args.backbone)
    data = load_tool_sets(args.data)
    adapter, history = train_choice_adapter(model, tokenizer, cfg, data)
    adapter.info = {
        "backbone": args.backbone,
        "command": "python scripts/train_choice_adapter.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
        "config": dataclasses.asdict(cfg),
        "dev": history["dev"],
        "dev_domains": history["dev_domains"],
        "seconds": history["seconds"],
        "threads": torch.get_num_threads(),
    }
    out = adapter.save(args.out)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
