"""The ``deltamem`` command."""

import argparse
import os
import shlex
import sys

from deltamem_agents.models import DEFAULT_BACKBONE

BACKBONE_HELP = "backbone name or transformers folder (default: %(default)s, the embedded SmolLM2-135M-Instruct)"


def build_parser() -> argparse.ArgumentParser:
    """The ``deltamem`` argument parser with every subcommand (each subcommand and argument has help text)."""
    parser = argparse.ArgumentParser(prog="deltamem", description="δ-mem online memory for local language models")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="short memory demo on the embedded backbone",
        description="Write a short conversation into a fresh memory and answer from it, on the embedded backbone.",
    )
    demo.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    demo.add_argument("--max-new-tokens", type=int, default=24, help="reply length limit (default: %(default)s)")
    inspect = commands.add_parser(
        "inspect-state",
        help="validate and describe a saved memory-state file",
        description="Check a memory-state file (safetensors bytes of a MemoryState) and print its adapter "
        "fingerprint, layers, shape, size and norm. Exits 2 when the file is not a valid state.",
    )
    inspect.add_argument("path", help="file holding MemoryState.to_bytes()")
    chat = commands.add_parser(
        "chat",
        help="interactive terminal chat with persistent memory per thread",
        description="Chat in the terminal; each thread's messages and memory are checkpointed in SQLite, so the "
        "same --thread resumes the conversation later.",
    )
    chat.add_argument("--thread", required=True, help="conversation name; the same name resumes it")
    chat.add_argument("--db", help="SQLite checkpoint file (default: $DELTAMEM_HOME/chat.db)")
    chat.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    chat.add_argument(
        "--adapter", help="folder of a saved adapter, or 'default' (the shipped default; today the identity)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=200, help="reply length limit (default: %(default)s)")
    bench = commands.add_parser(
        "bench",
        help="benchmarks: costs (ratios vs targets), scan, backbone overhead, turns vs replay, checkpoints",
        description="Run the benchmark sections and write JSON, markdown and plots to --out; ratios are measured "
        "in one run, with the machine recorded.",
    )
    bench.add_argument("--quick", action="store_true", help="short sizes for a smoke run")
    bench.add_argument("--out", default="docs/benchmarks", help="folder for results JSON, markdown and PNGs")
    bench.add_argument("--backbone", default=DEFAULT_BACKBONE, help=BACKBONE_HELP)
    bench.add_argument("--sections", default="costs,scan,overhead,turns,checkpoints", help="comma-separated subset")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (pin the process with taskset)")
    bench.add_argument("--turns", type=int, default=None, help="turns of the scripted conversation (50; quick 6)")
    bench.add_argument("--replay-every", type=int, default=None, help="time stateless replay every n-th turn")
    load = commands.add_parser(
        "bench-load",
        help="bounded load run: worker processes x concurrent threads x turns over one Postgres",
        description="Start worker processes that each serve one backbone and run many threads' turns against one "
        "shared Postgres checkpoint database; write throughput and latency tables to --out.",
    )
    load.add_argument(
        "--url",
        default=os.environ.get("DELTAMEM_POSTGRES_URL"),
        help="Postgres URL of the shared checkpoint database (default: $DELTAMEM_POSTGRES_URL)",
    )
    load.add_argument("--workers", default="4", help="worker processes; a comma-separated list runs each (1,2,4)")
    load.add_argument("--threads", type=int, default=100, help="conversation threads, all in flight at once")
    load.add_argument("--turns", type=int, default=5, help="user turns per thread")
    load.add_argument("--max-seconds", type=float, default=600, help="per run: no turn starts after this")
    load.add_argument("--model", default="tiny", help="'tiny' (random, fast) or a backbone, e.g. smollm2-135m-instruct")
    load.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit per turn")
    load.add_argument("--out", default="docs/benchmarks", help="folder for the results JSON and markdown")
    load.add_argument("--name", help="file name stem (default: load, or load-MODEL for other models)")
    load.add_argument("--keep-threads", action="store_true", help="keep the run's threads in the database")
    export = commands.add_parser(
        "export-adapter",
        help="copy a training checkpoint's adapter files (weights + config) into the package's adapters/",
        description="Copy adapter.safetensors and deltamem_config.json of a training checkpoint (e.g. runs/NAME) "
        "into deltamem_agents/adapters/NAME; optimizer, RNG and trainer state stay in the checkpoint.",
    )
    export.add_argument("checkpoint", help="a training checkpoint or adapter folder")
    export.add_argument("name", help="name of the shipped adapter (a folder name: letters, digits, '-', '_', '.')")
    export.add_argument("--force", action="store_true", help="replace an adapter of that name")
    from deltamem_agents.train.cli import add_train_parser

    add_train_parser(commands)
    from deltamem_agents.eval.cli import add_eval_parser

    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "chat":
        from deltamem_agents.apps.terminal_chat import run_terminal_chat

        return run_terminal_chat(args.thread, args.db, args.backbone, args.adapter, args.max_new_tokens)

    if args.command == "demo":
        from deltamem_agents.apps.demo import run_demo

        run_demo(args.backbone, args.max_new_tokens)
        return 0
    if args.command == "inspect-state":
        from deltamem_agents import DeltaMemError, MemoryState

        try:
            with open(args.path, "rb") as handle:
                state = MemoryState.from_bytes(handle.read())
        except (OSError, DeltaMemError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(
            f"adapter {state.fingerprint}, layers {list(state.layers)}, shape {tuple(state.tensor.shape)}, "
            f"{state.nbytes} bytes, norm {state.tensor.norm():.4f}"
        )
        return 0
    if args.command == "bench":
        from deltamem_agents.bench import run_bench

        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        try:
            run_bench(
                args.out,
                quick=args.quick,
                sections=sections,
                backbone=args.backbone,
                threads=args.threads,
                turns=args.turns,
                replay_every=args.replay_every,
                command="deltamem " + " ".join(argv if argv is not None else sys.argv[1:]),
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "bench-load":
        return _bench_load(args, argv)
    if args.command == "export-adapter":
        from deltamem_agents.core.adapter import export_adapter_files
        from deltamem_agents.core.errors import DeltaMemError

        try:
            target = export_adapter_files(args.checkpoint, args.name, force=args.force)
        except DeltaMemError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"exported {args.checkpoint} to {target}")
        return 0
    if args.command == "train":
        from deltamem_agents.train.cli import run_train

        return run_train(args)
    if args.command == "eval":
        from deltamem_agents.eval.cli import run_eval

        return run_eval(args)
    return 1


def _bench_load(args, argv: list[str] | None) -> int:
    from deltamem_agents.core.errors import DeltaMemError

    if not args.url:
        print(
            "error: no Postgres URL: pass --url or set DELTAMEM_POSTGRES_URL "
            "(`bash scripts/start-postgres.sh` starts a local server and prints its URL)",
            file=sys.stderr,
        )
        return 2
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        print(f"error: --workers takes a number or a list like 1,2,4, got {args.workers!r}", file=sys.stderr)
        return 2
    from deltamem_agents.bench.load import run_load

    try:
        run_load(
            args.url,
            workers=workers,
            threads=args.threads,
            turns=args.turns,
            max_seconds=args.max_seconds,
            model=args.model,
            out_dir=args.out,
            cleanup=not args.keep_threads,
            max_new_tokens=args.max_new_tokens,
            name=args.name,
            command="deltamem " + shlex.join(argv if argv is not None else sys.argv[1:]),
        )
    except DeltaMemError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
