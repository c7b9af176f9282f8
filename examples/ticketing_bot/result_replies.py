"""Replies after a tool result, on a fixed set (issue 12): does the reply state what the tool said?

Each item of ``result_replies.json`` is a request, the call the agent made, the tool's result and the facts of the
result a right reply states. The chat answers as the ticketing bot does after its tool round (the tool set's tools
bound, ``tool_choice="none"``, greedy) and a reply is right when it contains every fact (case-insensitive). Also
reported: the largest token 4-gram count in a reply, and the reply's length in sentences and words.

    python -m examples.ticketing_bot.result_replies --half tune --out docs/tool-choice/replies-after-results-tune
"""

import argparse
import json
import platform
import re
from pathlib import Path

from examples.ticketing_bot.tool_choice import load_requests, max_ngram_count

ITEMS = Path(__file__).with_name("result_replies.json")
HALVES = ("all", "tune", "held-out")


def load_items(half: str = "all", path: Path = ITEMS) -> dict:
    """``{tool set: [(request, call, result, facts)]}``; within each set, items alternate tune / held-out."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    sets = json.loads(path.read_text())["tool_sets"]
    keep = {"all": lambda i: True, "tune": lambda i: i % 2 == 0, "held-out": lambda i: i % 2 == 1}[half]
    return {name: [tuple(item) for i, item in enumerate(items) if keep(i)] for name, items in sets.items()}


def states_facts(reply: str, facts: list[str]) -> bool:
    return all(fact.lower() in reply.lower() for fact in facts)


def evaluate(chat, items: dict, log=print) -> tuple[dict, list[dict]]:
    """Answer every item after its tool result; ``({tool set and "all": counts}, rows)``."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    tool_sets = load_requests("all")
    rows = []
    for name, entries in items.items():
        bound = chat.bind_tools(tool_sets[name]["tools"], tool_choice="none")
        for request, call, result, facts in entries:
            call = {**call, "id": "call_1", "type": "tool_call"}
            messages = [
                SystemMessage(tool_sets[name]["system"]),
                HumanMessage(request),
                AIMessage("", tool_calls=[call]),
                ToolMessage(result, tool_call_id="call_1"),
            ]
            reply = bound.invoke(messages).content
            row = {
                "set": name,
                "request": request,
                "result": result,
                "facts": facts,
                "reply": reply,
                "right": states_facts(reply, facts),
                "max_4gram": max_ngram_count(chat.engine.tokenizer, reply),
                "sentences": len([s for s in re.split(r"(?<=[.!?])\s+", reply.strip()) if s]),
                "words": len(reply.split()),
            }
            rows.append(row)
            log(f"[{name}] {'ok ' if row['right'] else 'MISS'} {request} -> {reply!r}")
    return tally(rows), rows


def tally(rows: list[dict]) -> dict:
    out = {}
    for key in [*dict.fromkeys(r["set"] for r in rows), "all"]:
        part = [r for r in rows if key in ("all", r["set"])]
        out[key] = {
            "right": sum(r["right"] for r in part),
            "items": len(part),
            "max_4gram": max((r["max_4gram"] for r in part), default=0),
            "mean_words": round(sum(r["words"] for r in part) / max(len(part), 1), 1),
        }
    return out


def table(summary: dict) -> list[str]:
    lines = ["| tool set | reply states the result | max 4-gram in a reply | mean words |", "|---|---|---|---|"]
    for key, s in summary.items():
        pct = f"{100 * s['right'] / s['items']:.0f}%" if s["items"] else "-"
        lines.append(f"| {key} | {s['right']}/{s['items']} ({pct}) | {s['max_4gram']} | {s['mean_words']} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="default: the embedded backbone")
    parser.add_argument("--half", choices=HALVES, default="held-out")
    parser.add_argument("--result-copy-bias", type=float, default=None, help="override DeltaMemChat.result_copy_bias")
    parser.add_argument(
        "--reply-sentences", default=None, help="override DeltaMemChat.reply_sentences (a number, or none)"
    )
    parser.add_argument(
        "--sentence-words", default=None, help="override DeltaMemChat.reply_sentence_words (a number, or none)"
    )
    parser.add_argument(
        "--close-at-sentence-end", choices=["on", "off"], default=None, help="override reply_closes_at_sentence_end"
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)

    import torch

    from deltamem_agents.agents.chat import DeltaMemChat

    overrides = {}
    if args.result_copy_bias is not None:
        overrides["result_copy_bias"] = args.result_copy_bias
    if args.reply_sentences is not None:
        overrides["reply_sentences"] = None if args.reply_sentences == "none" else int(args.reply_sentences)
    if args.sentence_words is not None:
        overrides["reply_sentence_words"] = None if args.sentence_words == "none" else int(args.sentence_words)
    if args.close_at_sentence_end is not None:
        overrides["reply_closes_at_sentence_end"] = args.close_at_sentence_end == "on"
    chat = DeltaMemChat.from_backbone(args.backbone, **overrides)
    summary, rows = evaluate(chat, load_items(args.half))
    print("\n".join(table(summary)))
    if args.out:
        names = (
            "result_copy_bias",
            "reply_sentences",
            "reply_sentence_words",
            "reply_closes_at_sentence_end",
            "max_new_tokens",
        )
        settings = {k: getattr(chat, k) for k in names}
        machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
        meta = {"half": args.half, "backbone": chat.model_name, "settings": settings, "machine": machine}
        Path(f"{args.out}.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1))
        Path(f"{args.out}.md").write_text("\n".join(table(summary)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
