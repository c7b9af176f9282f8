"""Tool choice on the fixed request set (issue 12): the right tool, plain replies, and stated argument values.

    python -m examples.ticketing_bot.tool_choice --half held-out --out docs/tool-choice-after
    python -m examples.ticketing_bot.tool_choice --half tune --sets helpdesk,shop --modes any

The request set (``requests.json``, committed before any method work) has four tool sets of 6-7 tools from
different domains; every item is one fresh turn (the tool set's system prompt and the request) with that set's
tools bound. Modes: ``any`` (the model must call a tool), ``auto`` (it may reply in text) and ``named`` (the
expected tool is named in ``tool_choice``, so only the arguments are measured; tool items only). Measured: the right
tool under ``any``; under ``auto`` the right tool on tool items and a plain reply on reply items, separately; the
stated argument values (numbers, names, days, times the request spells out) copied exactly into the call; and the
largest count of any token 4-gram in a reply. The halves are fixed in the file (tool items and reply items each
alternate tune / held-out within a tool set): tune on ``tune``, report ``held-out``.
"""

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

from deltamem_agents.models import DEFAULT_BACKBONE

REQUESTS = Path(__file__).with_name("requests.json")
HALVES = ("tune", "held-out", "all")


def load_requests(half: str = "all", path: Path = REQUESTS) -> dict:
    """``{tool set: {"system", "tools" (OpenAI tool dicts), "items": [(text, expected, stated args)]}}``."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name, spec in data["tool_sets"].items():
        tools = [{"type": "function", "function": t} for t in spec["tools"]]
        indexed = list(enumerate(spec["items"]))
        items = []
        for kind in ("tool", "reply"):
            group = [(n, i) for n, i in indexed if (i[1] == "reply") == (kind == "reply")]
            items += group if half == "all" else group[(half == "held-out") :: 2]
        items = [tuple(i) for _, i in sorted(items, key=lambda pair: pair[0])]
        out[name] = {"system": spec["system"], "tools": tools, "items": items}
    return out


def max_ngram_count(tokenizer, text: str, n: int = 4) -> int:
    """How often the most frequent token n-gram of ``text`` occurs (0 for texts shorter than n tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return max(counts.values(), default=0)


def evaluate(chat, sets: dict, modes=("any", "auto"), log=print) -> tuple[dict, list[dict]]:
    """Run every item of ``sets`` in each mode; returns (summary per tool set and mode, rows)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    rows, summary = [], {}
    for set_name, spec in sets.items():
        for mode in modes:
            bound = chat.bind_tools(spec["tools"], tool_choice=mode) if mode != "named" else None
            for text, expected, stated in spec["items"]:
                if mode == "named" and expected == "reply":
                    continue
                t0 = time.perf_counter()
                if mode == "named":  # the expected tool is named: only the arguments are the model's
                    bound = chat.bind_tools(spec["tools"], tool_choice=expected)
                reply = bound.invoke([SystemMessage(spec["system"]), HumanMessage(text)])
                call = reply.tool_calls[0] if reply.tool_calls else None
                chosen = call["name"] if call else "reply"
                args = call["args"] if call else {}
                copied = {k: chosen == expected and args.get(k) == v for k, v in stated.items()}
                rows.append(
                    {
                        "set": set_name,
                        "mode": mode,
                        "request": text,
                        "expected": expected,
                        "chosen": chosen,
                        "args": args,
                        "stated": stated,
                        "copied": copied,
                        "reply": reply.content if not call else "",
                        "max_4gram": max_ngram_count(chat.engine.tokenizer, reply.content) if not call else 0,
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                mark = "ok  " if chosen == expected else "MISS"
                log(f"[{set_name}/{mode}] {mark} {chosen:>20} <- {text}  {json.dumps(args) if call else ''}")
            summary[f"{set_name}/{mode}"] = tally([r for r in rows if r["set"] == set_name and r["mode"] == mode])
    for mode in modes:
        summary[f"all/{mode}"] = tally([r for r in rows if r["mode"] == mode])
    return summary, rows


def evaluate_choice(chat, sets: dict, modes=("any", "auto"), log=print) -> tuple[dict, list[dict]]:
    """Like :func:`evaluate`, but only the likelihood choice DeltaMemChat makes before decoding (the decoded
    envelope is restricted to the chosen action, so the chosen tool is the one called). The actions are scored
    once per item; "any" takes the best tool, "auto" the best action with the reply's bias."""
    from deltamem_agents.serving.tool_choice import choose_action
    from deltamem_agents.serving.tool_grammar import REPLY_ACTION, tool_specs

    rows, summary = [], {}
    for set_name, spec in sets.items():
        specs = tool_specs(spec["tools"])
        for text, expected, stated in spec["items"]:
            t0 = time.perf_counter()
            messages = [{"role": "system", "content": spec["system"]}, {"role": "user", "content": text}]
            head = chat._choice_head()
            scores = choose_action(
                chat.engine, None, messages, specs, True, reply_bias=chat.reply_bias, head=head
            ).scores
            seconds = round((time.perf_counter() - t0) / len(modes), 2)
            for mode in modes:
                allowed = [a for a in scores if mode == "auto" or a != REPLY_ACTION]
                chosen = max(allowed, key=scores.get)
                rows.append(
                    {
                        "set": set_name,
                        "mode": mode,
                        "request": text,
                        "expected": expected,
                        "chosen": chosen,
                        "args": {},
                        "stated": stated,
                        "copied": {},
                        "reply": "",
                        "max_4gram": 0,
                        "seconds": seconds,
                        "scores": scores,
                    }
                )
                mark = "ok  " if chosen == expected else "MISS"
                log(f"[{set_name}/{mode}] {mark} {chosen:>20} <- {text}")
        for mode in modes:
            summary[f"{set_name}/{mode}"] = tally([r for r in rows if r["set"] == set_name and r["mode"] == mode])
    for mode in modes:
        summary[f"all/{mode}"] = tally([r for r in rows if r["mode"] == mode])
    return summary, rows


def combine(choice_rows: list[dict], named_rows: list[dict]) -> dict:
    """Stated values exact under "any", from a ``--choice-only`` run and a ``named`` run of the same items: with
    likelihood choice, a call of the right tool is decoded from the same prompt and grammar as under ``named``
    (the chosen tool's instructions only), so a value counts when the "any" choice was right and ``named`` copied
    it. ``{tool set: (exact, stated)}`` plus ``"all"``."""
    right = {(r["set"], r["request"]) for r in choice_rows if r["mode"] == "any" and r["chosen"] == r["expected"]}
    out: dict[str, list[int]] = {}
    for row in named_rows:
        for ok in row["copied"].values():
            for key in (row["set"], "all"):
                counts = out.setdefault(key, [0, 0])
                counts[0] += bool(ok) and (row["set"], row["request"]) in right
                counts[1] += 1
    return {key: tuple(counts) for key, counts in out.items()}


def tally(rows: list[dict]) -> dict:
    tool = [r for r in rows if r["expected"] != "reply"]
    reply = [r for r in rows if r["expected"] == "reply"]
    values = [ok for r in tool for ok in r["copied"].values()]
    return {
        "tool_right": sum(r["chosen"] == r["expected"] for r in tool),
        "tool_items": len(tool),
        "reply_right": sum(r["chosen"] == "reply" for r in reply),
        "reply_items": len(reply),
        "args_exact": sum(values),
        "args_stated": len(values),
        "max_4gram": max((r["max_4gram"] for r in rows), default=0),
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }


def table(summary: dict) -> list[str]:
    def pct(a, b):
        return f"{a}/{b} ({a / b:.0%})" if b else "-"

    lines = [
        "| tool set / mode | right tool | right reply | stated args exact | max 4-gram in a reply |",
        "|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        if key.endswith("/any"):
            s = {**s, "reply_items": 0}  # under "any" a reply is not allowed: the reply items are not counted
        lines.append(
            f"| {key} | {pct(s['tool_right'], s['tool_items'])} | {pct(s['reply_right'], s['reply_items'])} | "
            f"{pct(s['args_exact'], s['args_stated'])} | {s['max_4gram']} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--half", choices=HALVES, default="held-out")
    parser.add_argument("--sets", default="", help="comma-separated tool sets (default: all)")
    parser.add_argument("--modes", default="any,auto")
    parser.add_argument("--tool-scoring", default=None, help="override DeltaMemChat.tool_scoring")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the chat's reply budget")
    parser.add_argument("--copy-bias", type=float, default=None, help="override DeltaMemChat.copy_bias")
    parser.add_argument("--reply-bias", type=float, default=None, help="override DeltaMemChat.reply_bias")
    parser.add_argument(
        "--span-arguments", default=None, choices=["none", "strings"], help="override DeltaMemChat.span_arguments"
    )
    parser.add_argument(
        "--span-scoring", default=None, choices=["greedy", "likelihood"], help="override DeltaMemChat.span_scoring"
    )
    parser.add_argument("--span-length-power", type=float, default=None, help="override DeltaMemChat.span_length_power")
    parser.add_argument(
        "--choice-head", default=None, help="override DeltaMemChat.choice_head: a folder, or none (channel score alone)"
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--choice-only",
        action="store_true",
        help="likelihood tool choice only: score the actions as DeltaMemChat does, decode nothing (fast; no "
        "argument match)",
    )
    parser.add_argument("--stated-only", action="store_true", help="only the tool items that state argument values")
    parser.add_argument(
        "--reply-items", action="store_true", help="only the items that need a plain reply (their replies' 4-grams)"
    )
    parser.add_argument(
        "--combine",
        nargs=2,
        metavar=("CHOICE_JSON", "NAMED_JSON"),
        help="print stated values exact under any from a --choice-only run and a named run (no model)",
    )
    args = parser.parse_args(argv)
    if args.combine:
        choice, named = (json.loads(Path(p).read_text())["rows"] for p in args.combine)
        for key, (exact, stated) in combine(choice, named).items():
            print(f"{key}/any: {exact}/{stated} stated values exact")
        return 0

    import torch

    from deltamem_agents.agents.chat import DeltaMemChat

    overrides = {}
    if args.tool_scoring is not None:
        overrides["tool_scoring"] = args.tool_scoring
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.copy_bias is not None:
        overrides["copy_bias"] = args.copy_bias
    if args.reply_bias is not None:
        overrides["reply_bias"] = args.reply_bias
    if args.span_arguments is not None:
        overrides["span_arguments"] = {} if args.span_arguments == "none" else args.span_arguments
    if args.span_scoring is not None:
        overrides["span_scoring"] = args.span_scoring
    if args.span_length_power is not None:
        overrides["span_length_power"] = args.span_length_power
    if args.choice_head is not None:
        overrides["choice_head"] = None if args.choice_head == "none" else args.choice_head
    chat = DeltaMemChat.from_backbone(args.backbone, **overrides)
    sets = load_requests(args.half)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    if args.stated_only:
        sets = {k: {**v, "items": [i for i in v["items"] if i[2]]} for k, v in sets.items()}
    if args.reply_items:
        sets = {k: {**v, "items": [i for i in v["items"] if i[1] == "reply"]} for k, v in sets.items()}
    run = evaluate_choice if args.choice_only else evaluate
    summary, rows = run(chat, sets, tuple(args.modes.split(",")))
    print("\n".join(table(summary)))
    if args.out:
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "backbone": args.backbone,
            "half": args.half,
            "settings": {
                k: getattr(chat, k, None)
                for k in (
                    "tool_scoring",
                    "reply_bias",
                    "copy_bias",
                    "span_arguments",
                    "span_scoring",
                    "span_length_power",
                    "choice_head",
                    "max_new_tokens",
                    "repetition",
                )
            },
            "choice_head_fingerprint": chat.choice_head_fingerprint(),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"summary": summary, "machine": machine, "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        out.with_suffix(".md").write_text("\n".join(table(summary)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
