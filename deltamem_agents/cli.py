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
    args = parser.parse_args(argv)

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
