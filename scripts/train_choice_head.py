"""Train the tool-choice head (``serving.choice_head``) on the generated tool sets.

    python scripts/train_choice_head.py extract FEATURES.safetensors [--domains a,b,...]   # slow: one forward per item
    python scripts/train_choice_head.py fit OUT_DIR FEATURES.safetensors [FEATURES ...]    # seconds

``extract`` runs the chat's own channel-scoring forward on every item (empty memory) and keeps each option's
channel score and hidden states; run it in two processes on disjoint ``--domains`` to use two cores. ``fit``
picks the L2 weight by domain-wise cross-validation, refits on everything and writes OUT_DIR/choice_head.* with
the cross-validation table and the data's digest. Pin it: taskset -c N, OMP_NUM_THREADS=1.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from deltamem_agents.train.choice_training import (
    DEFAULT_LAYERS,
    TOOL_SETS,
    ItemFeatures,
    accuracy,
    choose_l2,
    extract,
    fit_head,
    items_of,
    load_features,
    load_tool_sets,
    save_features,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="channel scores and hidden states of every item (slow)")
    ex.add_argument("out", help="features file (.safetensors)")
    ex.add_argument("--domains", default="", help="comma-separated domains (default: all)")
    ex.add_argument("--data", default=str(TOOL_SETS))
    ex.add_argument("--per-tool", type=int, default=None, help="only the first N requests of each tool")
    ex.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)), help="hidden-state indices")
    fit = sub.add_parser("fit", help="fit the head on extracted features and save it")
    fit.add_argument("out", help="folder for choice_head.safetensors / .json")
    fit.add_argument("features", nargs="+")
    fit.add_argument("--data", default=str(TOOL_SETS))
    fit.add_argument("--layers", default="", help="use only these of the extracted layers (default: all of them)")
    args = parser.parse_args(argv)
    if args.command == "extract":
        from deltamem_agents.agents.chat import DeltaMemChat

        engine = DeltaMemChat.from_backbone(choice_head=None).engine
        domains = args.domains.split(",") if args.domains else None
        items = items_of(load_tool_sets(args.data), domains, args.per_tool)
        layers = tuple(int(x) for x in args.layers.split(","))
        feats = extract(engine, items, layers)
        save_features(feats, args.out)
        digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
        meta = {"layers": layers, "items": len(items), "per_tool": args.per_tool, "domains": domains, "data": digest}
        Path(args.out).with_suffix(".json").write_text(json.dumps(meta))
        print(f"{len(items)} items -> {args.out}")
        return 0
    parts = [load_features(p) for p in args.features]
    metas = [json.loads(Path(p).with_suffix(".json").read_text()) for p in args.features]
    if any(m["layers"] != metas[0]["layers"] for m in metas):
        raise SystemExit(f"the features files hold different layers: {[m['layers'] for m in metas]}")
    layers = tuple(metas[0]["layers"])
    feats = ItemFeatures(*([x for p in parts for x in getattr(p, f)] for f in ItemFeatures.__dataclass_fields__))
    if args.layers:
        chosen = tuple(int(x) for x in args.layers.split(","))
        feats, layers = feats.layers(layers, chosen), chosen
    table = choose_l2(feats, layers)
    for l2, result in table.items():
        print(f"l2 {l2:g}: cross-validated on held-out domains {result}")

    def score(r):  # the worst of the three rates decides
        return min(right / n for right, n in r.values() if n)

    best = max(table, key=lambda l2: score(table[l2]))
    head = fit_head(feats, layers, best)
    head.info = {
        "command": "python scripts/train_choice_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
        "items": len(feats.answers),
        "domains": sorted(set(feats.domains)),
        "l2": best,
        "cross_validation": {str(k): v for k, v in table.items()},
        "train_accuracy": accuracy(head, feats),
    }
    head.save(args.out)
    print(f"l2 {best:g}, channel weight {head.channel_weight:.3f}, train {head.info['train_accuracy']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
