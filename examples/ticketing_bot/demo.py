"""Scripted multi-session demo (each session in a new process, days apart) and an interactive mode.

    python -m examples.ticketing_bot.demo                 # the scripted story, 3 sessions
    python -m examples.ticketing_bot.demo --interactive   # chat with the bot yourself (--user NAME)

State lives in two SQLite files in --data (tickets.db: the ticket database the tools use; checkpoints.db:
LangGraph's checkpoints, holding messages and the δ-mem memory per thread).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SESSIONS = [
    (
        "Monday",
        [
            (
                "Hi, my laptop will not turn on since this morning's update. Please open a ticket for it.",
                "open a ticket",
            ),
            ("I already tried holding the power button for 30 seconds. Please add that as a comment.", "add a comment"),
        ],
    ),
    (
        "Wednesday",
        [
            ("Hi again. What is the status of my ticket?", "tell the ticket's status"),
            ("Thanks. What did I already try?", "tell what was tried"),
        ],
    ),
    (
        "Friday",
        [
            ("Good news: the laptop works again. Please close my ticket.", "close the ticket"),
            ("Thank you for your help!", "reply (no tool)"),
        ],
    ),
]
BETWEEN_SESSIONS = {
    0: ("technician", "Replacement battery ordered, arriving Thursday.", "waiting for parts", "Tuesday")
}


def run_session(index: int, data: Path, user: str) -> None:
    """One session of the story, in this process: load everything from disk, play the turns, print metrics."""
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.sqlite import SqliteSaver

    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.store import SqliteMemoryStore
    from deltamem_agents.agents.turn import messages_in_memory
    from examples.ticketing_bot.bot import build_bot
    from examples.ticketing_bot.tickets import TicketDB
    from examples.ticketing_bot.tool_choice import max_ngram_count

    day, turns = SESSIONS[index]
    started = time.perf_counter()
    store = SqliteMemoryStore(data / "checkpoints.db")  # memory states beside the checkpoints, kept across sessions
    chat = DeltaMemChat.from_backbone(window_messages=4, store=store)
    db = TicketDB(data / "tickets.db")
    print(f"\n=== session {index + 1} · {day} · new process, model loaded in {time.perf_counter() - started:.1f}s ===")
    record = []
    config = {"configurable": {"thread_id": f"support-{user}", "user_id": user, "story_day": day}}
    with SqliteSaver.from_conn_string(str(data / "checkpoints.db")) as saver:
        bot = build_bot(chat, db, saver)
        for text, asked in turns:
            before = len(bot.get_state(config).values.get("messages", []))
            t0 = time.perf_counter()
            state = bot.invoke({"messages": [HumanMessage(text)]}, config)
            latency = time.perf_counter() - t0
            new = state["messages"][before:]
            replies = [m for m in new if isinstance(m, AIMessage)]
            calls = [
                f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in c['args'].items())})"
                for m in replies
                for c in m.tool_calls
            ]
            prompt = sum((m.usage_metadata or {}).get("input_tokens", 0) for m in replies)
            print(f"user: {text}")
            print(f"  asked for: {asked} · agent did: {'; '.join(calls) or 'replied'}")
            print(f"  agent: {replies[-1].content}")
            print(
                f"  [prompt {prompt} tokens over {len(replies)} model calls · {latency:.1f}s · "
                f"memory {len(chat.stored_memory(state['messages']) or b''):,} B · "
                f"{len(state['messages'])} messages in thread · "
                f"{messages_in_memory(state['messages'])} written to memory]"
            )
            record.append(
                {
                    "text": text,
                    "asked": asked,
                    "calls": [{"name": c["name"], "args": c["args"]} for m in replies for c in m.tool_calls],
                    "replies": [m.content for m in replies if m.content],
                    "seconds": latency,
                    "max_4gram": max((max_ngram_count(chat.engine.tokenizer, m.content) for m in replies), default=0),
                }
            )
    (data / f"story-session-{index + 1}.json").write_text(json.dumps(record, indent=1))
    for ticket in db.list(user, include_closed=True):
        print(f"  ticket #{ticket['id']}: {ticket['title']!r} — {ticket['status']} (updated {ticket['updated']})")


def staff_update(data: Path, user: str, after_session: int) -> None:
    from examples.ticketing_bot.tickets import TicketDB

    if after_session not in BETWEEN_SESSIONS:
        return
    author, text, status, day = BETWEEN_SESSIONS[after_session]
    db = TicketDB(data / "tickets.db")
    for ticket in db.list(user):  # on a story day, as the agent's own changes are (not today's date)
        db.comment(user, ticket["id"], text, author=author, day=day)
        db.update_status(user, ticket["id"], status, day)
        print(f"\n(meanwhile the {author} updated ticket #{ticket['id']}: {text!r}, status {status!r})")


def interactive(data: Path, user: str) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.store import SqliteMemoryStore
    from deltamem_agents.apps.terminal_chat import chat_loop
    from examples.ticketing_bot.bot import build_bot
    from examples.ticketing_bot.tickets import TicketDB

    store = SqliteMemoryStore(data / "checkpoints.db")  # memory states beside the checkpoints
    chat = DeltaMemChat.from_backbone(max_new_tokens=120, store=store)
    config = {"configurable": {"thread_id": f"support-{user}", "user_id": user}}
    with SqliteSaver.from_conn_string(str(data / "checkpoints.db")) as saver:
        chat_loop(build_bot(chat, TicketDB(data / "tickets.db"), saver), config, f"Support bot for {user}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".ticketing_bot_data", help="folder for tickets.db and checkpoints.db")
    parser.add_argument("--user", default="dana")
    parser.add_argument("--interactive", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep earlier data instead of starting the story over")
    parser.add_argument("--session", type=int, help=argparse.SUPPRESS)  # internal: run one session in-process
    args = parser.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    if args.interactive:
        interactive(data, args.user)
        return 0
    if args.session is not None:
        run_session(args.session, data, args.user)
        return 0
    if not args.keep:
        for name in ("tickets.db", "checkpoints.db"):
            for suffix in ("", "-wal", "-shm"):
                (data / (name + suffix)).unlink(missing_ok=True)
    for index in range(len(SESSIONS)):
        command = [
            sys.executable,
            "-m",
            "examples.ticketing_bot.demo",
            "--data",
            str(data),
            "--user",
            args.user,
            "--session",
            str(index),
        ]
        subprocess.run(command, check=True)
        staff_update(data, args.user, index)
    return scorecard(data, args.user)


def scorecard(data: Path, user: str) -> int:
    """Print the story's checks (exact predicates over the ticket database and the recorded turns)."""
    from examples.ticketing_bot.tickets import TicketDB

    sessions = [json.loads((data / f"story-session-{i + 1}.json").read_text()) for i in range(len(SESSIONS))]
    db = TicketDB(data / "tickets.db")
    tickets = [db.get(user, t["id"]) for t in db.list(user, include_closed=True)]
    ids = {t["id"] for t in tickets}
    calls = [c for session in sessions for turn in session for c in turn["calls"]]
    session2 = " ".join(r for turn in sessions[1] for r in turn["replies"])
    laptop = [t for t in tickets if "laptop" in (t["title"] + " " + t["description"]).lower()]
    checks = [
        ("a ticket was created whose title or description contains 'laptop'", bool(laptop)),
        (
            "a comment containing 'power' was added",
            any("power" in c["text"].lower() for t in tickets for c in t["comments"] if c["author"] == user),
        ),
        ("session 2's replies contain 'waiting for parts'", "waiting for parts" in session2.lower()),
        ("session 2's replies contain 'Thursday'", "thursday" in session2.lower()),
        (
            "the user's ticket is closed after session 3",
            bool(tickets) and all(t["status"] == "closed" for t in tickets),
        ),
        (
            "no call names a ticket the user does not have",
            all(c["args"].get("ticket_id", min(ids, default=0)) in ids for c in calls),
        ),
        (
            "no reply repeats a token 4-gram more than twice",
            all(turn["max_4gram"] <= 2 for session in sessions for turn in session),
        ),
    ]
    print("\n=== scorecard ===")
    for session, (day, _) in zip(sessions, SESSIONS):
        for turn in session:
            did = "; ".join(f"{c['name']}({json.dumps(c['args'])})" for c in turn["calls"]) or "replied"
            print(f"{day:>9} · asked: {turn['asked']:<26} · did: {did}")
    for name, ok in checks:
        print(f"  [{'x' if ok else ' '}] {name}")
    model_time = sum(turn["seconds"] for session in sessions for turn in session)
    passed = sum(ok for _, ok in checks)
    print(
        f"{passed}/{len(checks)} checks passed · model time {model_time:.1f}s (invoke latencies, model load excluded)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
