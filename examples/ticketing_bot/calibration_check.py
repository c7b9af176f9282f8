"""Does calibrating the likelihood tool choice against content-free requests help? (issue 12, tune half only)

    python -m examples.ticketing_bot.calibration_check --out docs/tool-choice/tune-calibration.json

Contextual calibration: each action's channel score of a content-free request ("N/A", "[MASK]", "?") given the
tool set's system message is that action's prior; the calibrated score of a real request is its channel score
minus ``weight`` times the prior. The channel scores of the tune half come from
``docs/tool-choice/tune-scores.json`` (written before; same scoring as ``serving.tool_choice.channel_scores``).
Prints right tool under "any", and under "auto" the tool items and reply items, per prior, weight and reply bias.
Normalising per token instead would change nothing here: every action scores the same request tokens.
"""

import argparse
import json
from pathlib import Path

from examples.ticketing_bot.tool_choice import load_requests

SCORES = Path(__file__).parents[2] / "docs" / "tool-choice" / "tune-scores.json"
NULLS = ("N/A", "[MASK]", "?")


def priors(chat) -> dict:
    """``{tool set: {null request: {action: channel score}}}``."""
    from deltamem_agents.serving.tool_choice import channel_scores
    from deltamem_agents.serving.tool_grammar import tool_specs

    out = {}
    for name, spec in load_requests("all").items():
        specs = tool_specs(spec["tools"])
        for null in NULLS:
            messages = [{"role": "system", "content": spec["system"]}, {"role": "user", "content": null}]
            out.setdefault(name, {})[null] = channel_scores(chat.engine, None, messages, specs, True)
    return out


def tally(rows: list[dict], prior: dict, null: str | None, weight: float, bias: float) -> tuple[int, int, int]:
    any_right = auto_tools = auto_replies = 0
    for row in rows:
        base = prior[row["set"]][null] if null else {}
        scores = {a: s - weight * base.get(a, 0.0) for a, s in row["channel"].items()}
        tools = {a: s for a, s in scores.items() if a != "reply"}
        auto = max(scores, key=lambda a: scores[a] + (bias if a == "reply" else 0.0))
        if row["exp"] == "reply":
            auto_replies += auto == "reply"
        else:
            any_right += max(tools, key=tools.get) == row["exp"]
            auto_tools += auto == row["exp"]
    return any_right, auto_tools, auto_replies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the priors and the table as JSON")
    args = parser.parse_args(argv)
    from deltamem_agents.agents.chat import DeltaMemChat

    rows = json.loads(SCORES.read_text())
    prior = priors(DeltaMemChat.from_backbone())
    tools, replies = sum(r["exp"] != "reply" for r in rows), sum(r["exp"] == "reply" for r in rows)
    table = []
    print(f"| prior | weight | reply bias | any ({tools}) | auto tools ({tools}) | auto replies ({replies}) |")
    print("|---|---|---|---|---|---|")
    for null, weight in [(None, 0.0)] + [(n, w) for n in NULLS for w in (0.5, 1.0)]:
        for bias in (0.0, 1.0, 1.5, 2.0, 3.0):
            result = tally(rows, prior, null, weight, bias)
            table.append({"prior": null, "weight": weight, "reply_bias": bias, "result": result})
            print(f"| {null or 'none'} | {weight} | {bias} | " + " | ".join(map(str, result)) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"priors": prior, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
