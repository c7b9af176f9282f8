"""The ``deltamem`` command."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltamem", description="δ-mem online memory for local language models")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="short memory demo on the embedded backbone")
    demo.add_argument("--backbone", default="smollm2-135m-instruct")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    inspect = commands.add_parser("inspect-state", help="validate and describe a saved memory-state file")
    inspect.add_argument("path")
    chat = commands.add_parser("chat", help="interactive terminal chat with persistent memory per thread")
    chat.add_argument("--thread", required=True, help="conversation name; the same name resumes it")
    chat.add_argument("--db", help="SQLite checkpoint file (default: $DELTAMEM_HOME/chat.db)")
    chat.add_argument("--backbone", default="smollm2-135m-instruct")
    chat.add_argument("--adapter", help="folder of a saved adapter")
    chat.add_argument("--max-new-tokens", type=int, default=200)
    args = parser.parse_args(argv)

    if args.command == "chat":
        from deltamem_agents.terminal_chat import run_terminal_chat

        return run_terminal_chat(args.thread, args.db, args.backbone, args.adapter, args.max_new_tokens)

    if args.command == "demo":
        from deltamem_agents.demo import run_demo

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
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
