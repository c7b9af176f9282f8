"""``deltamem eval``: run the methods on a task and write JSON, a markdown table and a plot."""

import argparse
import time

from deltamem_agents.models import DEFAULT_BACKBONE


def add_eval_parser(commands) -> None:
    """Register the ``eval`` subcommand."""
    p = commands.add_parser(
        "eval",
        help="evaluate recall: δ-mem vs window, full history, BM25 and the control",
        description="Answer each question with every method (greedy, pinned decoding; recorded in the results), "
        "score contains-answer with bootstrap CIs, and write JSON, a markdown table and a plot to --report-dir.",
    )
    p.add_argument(
        "task",
        choices=["synthetic", "locomo", "closed"],
        help="synthetic episodes, LoCoMo conversations (--data), or closed: rung 1, the fixed closed-fact set",
    )
    p.add_argument("--data", help="LoCoMo JSON (read in place; e.g. ../shared/data/locomo/locomo_dev.json)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name or folder (default: %(default)s)")
    p.add_argument(
        "--adapter",
        help="adapter folder (a training checkpoint works), or 'default' (the shipped default adapter, which is the "
        "zero-init identity until one passes rungs 1 and 4); needed for δ-mem methods",
    )
    p.add_argument(
        "--methods", default="window,full,bm25,delta,delta_bm25,delta_control", help="comma-separated method names"
    )
    p.add_argument("--limit", type=int, help="at most this many conversations")
    p.add_argument("--questions", type=int, help="at most this many questions per conversation (evenly spaced)")
    p.add_argument("--count", type=int, default=60, help="synthetic: number of test episodes")
    p.add_argument("--level", type=int, default=3, help="synthetic: curriculum level of the test episodes")
    p.add_argument(
        "--half", choices=["tune", "report"], default="tune", help="closed: tune half (choosing) or report half"
    )
    p.add_argument("--window", type=int, default=2, help="recent messages (turns for LoCoMo) kept in the prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="cap of the full-history prompt")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default: %(default)s)")
    p.add_argument("--cache-dir", default="eval-cache", help="per-conversation result cache (resumable)")
    p.add_argument("--report-dir", default="docs/eval", help="folder for the JSON, markdown and plot")
    p.add_argument("--name", help="report file name (default: the task)")
    p.add_argument("--threads", type=int, help="torch threads (pin the process with taskset too)")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from deltamem_agents.eval.report import markdown, write_report
    from deltamem_agents.eval.runner import evaluate
    from deltamem_agents.eval.tasks import closed_task, locomo_task, synthetic_task
    from deltamem_agents.models.backbone_zoo import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone(args.backbone)
    if args.adapter:
        from deltamem_agents.models.default_adapter import apply_adapter

        apply_adapter(model, args.adapter, args.backbone)
    if args.task == "locomo":
        if not args.data:
            raise SystemExit("error: locomo needs --data PATH (the LoCoMo JSON)")
        conversations = locomo_task(args.data)
    elif args.task == "closed":
        conversations = closed_task(args.half)
    else:
        conversations = synthetic_task(args.count, args.level)
    conversations = conversations[: args.limit] if args.limit else conversations
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.adapter:
        methods = [m for m in methods if not m.startswith("delta")]
    started = time.perf_counter()
    records = evaluate(
        model,
        tokenizer,
        args.task,
        conversations,
        methods,
        args.cache_dir,
        questions_per_conversation=args.questions,
        max_new_tokens=args.max_new_tokens,
        window=args.window,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    meta = {
        "task": args.task,
        "half": args.half if args.task == "closed" else None,
        "conversations": len(conversations),
        "questions_per_conversation": args.questions,
        "adapter": args.adapter,
        "window": args.window,
        "max_prompt_tokens": args.max_prompt_tokens,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    summary = write_report(records, args.report_dir, args.name or args.task, meta)
    print(markdown(summary))
    return 0
