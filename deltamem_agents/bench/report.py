"""Write benchmark results as JSON, markdown tables and PNG plots."""

import json
import math
from pathlib import Path

MB = 1024 * 1024


def machine_label(machine: dict) -> str:
    """Short machine column: CPU, cores used, torch version, device."""
    return f"{machine['cpu']}, {machine['cores_used']} core(s), torch {machine['torch']}, {machine['device']}"


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], machine: dict) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns`` and the machine on every row."""
    head = "| " + " | ".join(h for _, h in columns) + " | machine |"  # every row names where it ran
    rule = "|" + "---|" * (len(columns) + 1)
    body = [
        "| " + " | ".join(_fmt(row.get(key, float("nan"))) for key, _ in columns) + f" | {machine_label(machine)} |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


SCAN_COLUMNS = [
    ("T", "T"),
    ("H", "H"),
    ("pass", "pass"),
    ("recurrent_tok_s", "token loop tok/s"),
    ("chunked_tok_s", "chunked tok/s"),
    ("speedup", "speed-up"),
    ("runs", "runs"),
]
OVERHEAD_COLUMNS = [
    ("variant", "memory"),
    ("path", "decode path"),
    ("metric", "pass"),
    ("tokens", "tokens"),
    ("context", "context"),
    ("plain_tok_s", "plain tok/s"),
    ("memory_tok_s", "with memory tok/s"),
    ("ratio", "memory / plain"),
    ("adapter_mb", "adapter MB"),
    ("peak_plain_mb", "peak +RSS plain MB"),
    ("peak_memory_mb", "peak +RSS memory MB"),
    ("runs", "runs"),
]
TURNS_SUMMARY_COLUMNS = [
    ("turns", "turns"),
    ("answer_tokens", "answer tokens"),
    ("last_turn_replay_prompt_tokens", "replay prompt tok (last)"),
    ("last_turn_mem_prompt_tokens", "δ-mem prompt tok (last)"),
    ("last_turn_replay_ttft_s", "replay TTFT s"),
    ("last_turn_kv_ttft_s", "kept-KV TTFT s"),
    ("last_turn_mem_ttft_s", "δ-mem TTFT s"),
    ("ttft_ratio_replay_over_mem", "replay / δ-mem TTFT"),
    ("state_bytes", "δ-mem state B"),
    ("kv_bytes_of_history", "KV cache of history B"),
    ("kv_over_state", "KV / state"),
]
TURN_COLUMNS = [
    ("turn", "turn"),
    ("replay_prompt_tokens", "replay prompt tok"),
    ("replay_ttft_s", "replay TTFT s"),
    ("replay_latency_s", "replay turn s"),
    ("kv_new_tokens", "kept-KV new tok"),
    ("kv_ttft_s", "kept-KV TTFT s"),
    ("kv_bytes", "KV cache B"),
    ("mem_write_tokens", "δ-mem written tok"),
    ("mem_prompt_tokens", "δ-mem prompt tok"),
    ("mem_ttft_s", "δ-mem TTFT s"),
    ("mem_latency_s", "δ-mem turn s"),
    ("state_bytes", "state B"),
]
CHECKPOINT_COLUMNS = [
    ("state", "memory"),
    ("state_bytes", "state bytes"),
    ("checkpoint_blob_bytes", "checkpoint blob bytes"),
    ("db_bytes_per_checkpoint", "SQLite file bytes / checkpoint"),
    ("put_ms", "put ms"),
    ("get_by_id_ms", "get_tuple(id) ms"),
    ("get_latest_ms", "get_tuple(latest) ms"),
    ("checkpoints", "checkpoints"),
]


def to_markdown(results: dict) -> str:
    """The results as markdown: the command, the machine, one table per section."""
    machine, sections = results["machine"], results["sections"]
    lines = [
        "# δ-mem benchmark results" + (" (--quick)" if results["quick"] else ""),
        "",
        f"Command: `{results['command']}` (commit {results.get('commit') or 'unknown'})  ",
        f"Machine: {machine_label(machine)}; CPU affinity {machine['cpu_affinity']}, "
        f"{machine['torch_threads']} torch thread(s); clock: {machine.get('clock', 'wall')}. "
        "Each number is the median of `runs` runs after a warm-up; ratios pair the two sides of the same round, "
        "measured in the same process with the order alternating.",
        "",
    ]
    if "costs" in sections:
        from deltamem_agents.bench.costs import costs_table

        lines += ["## Costs: memory / plain, and chunked scan / token loop", "", costs_table(sections["costs"]), ""]
    if "scan" in sections:
        lines += [
            "## Scan: chunked vs token loop (B = 1, r = 8, float32)",
            "",
            table(sections["scan"], SCAN_COLUMNS, machine),
            "",
        ]
    if "overhead" in sections:
        rows = [
            {
                **r,
                "adapter_mb": r["adapter_bytes"] / MB,
                "peak_plain_mb": r["peak_plain_bytes"] / MB,
                "peak_memory_mb": r["peak_memory_bytes"] / MB,
            }
            for r in sections["overhead"]
        ]
        lines += ["## Backbone overhead (embedded backbone, writes on)", "", table(rows, OVERHEAD_COLUMNS, machine), ""]
    if "turns" in sections:
        turns = sections["turns"]
        lines += [
            "## Turns: stateless replay vs kept KV cache vs δ-mem (TSW, window of recent messages)",
            "",
            table(turns["summary"], TURNS_SUMMARY_COLUMNS, machine),
            "",
            "Per turn:",
            "",
            table(turns["per_turn"], TURN_COLUMNS, machine),
            "",
        ]
    if "checkpoints" in sections:
        lines += [
            "## Checkpoints: memory channel in LangGraph's SqliteSaver",
            "",
            table(sections["checkpoints"], CHECKPOINT_COLUMNS, machine),
            "",
        ]
    return "\n".join(lines)


def plot(results: dict, folder: Path, suffix: str) -> list[Path]:
    """PNG plots of the sections present; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sections = results["sections"]
    if "scan" in sections:
        fig, ax = plt.subplots(figsize=(6, 4))
        for heads in sorted({r["H"] for r in sections["scan"]}):
            for name in ("forward", "forward+backward"):
                rows = [r for r in sections["scan"] if r["H"] == heads and r["pass"] == name]
                ax.plot([r["T"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"H={heads} {name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("chunked speed-up over the token loop (x)")
        ax.set_title("δ-mem scan")
        ax.legend()
        written.append(_save(fig, folder / f"scan{suffix}.png"))
    if "overhead" in sections:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = sections["overhead"]
        labels = [f"{r['variant']} {r['metric']}\n{'kernel' if 'kernel' in r['path'] else 'torch'}" for r in rows]
        ax.bar(
            labels,
            [r["ratio"] for r in rows],
            color=["tab:blue" if r["metric"] == "decode" else "tab:orange" for r in rows],
        )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("tokens/s with memory / plain")
        ax.set_title("Backbone overhead of δ-mem")
        written.append(_save(fig, folder / f"overhead{suffix}.png"))
    if "turns" in sections:
        turns = sections["turns"]["per_turn"]
        x = [r["turn"] for r in turns]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        top.plot(x, [r["replay_prompt_tokens"] for r in turns], label="replay: prompt tokens")
        top.plot(x, [r["kv_new_tokens"] for r in turns], label="kept KV: new tokens")
        top.plot(x, [r["mem_prompt_tokens"] for r in turns], label="δ-mem: prompt tokens")
        top.plot(x, [r["mem_write_tokens"] for r in turns], ls="--", label="δ-mem: written tokens")
        top.set_ylabel("tokens per turn")
        top.legend()
        replay = [r for r in turns if "replay_ttft_s" in r]
        bottom.plot([r["turn"] for r in replay], [r["replay_ttft_s"] for r in replay], marker=".", label="replay TTFT")
        bottom.plot(x, [r["kv_ttft_s"] for r in turns], label="kept KV TTFT")
        bottom.plot(x, [r["mem_ttft_s"] for r in turns], label="δ-mem TTFT (write + read)")
        bottom.plot([r["turn"] for r in replay], [r["replay_latency_s"] for r in replay], ls=":", label="replay turn")
        bottom.plot(x, [r["mem_latency_s"] for r in turns], ls=":", label="δ-mem turn")
        bottom.set_xlabel("turn")
        bottom.set_ylabel("seconds")
        bottom.legend()
        fig.suptitle("Scripted conversation: prompt size and latency per turn")
        written.append(_save(fig, folder / f"turns{suffix}.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [r["kv_bytes"] for r in turns], label="KV cache of the history")
        ax.plot(x, [max(r["state_bytes"], 1) for r in turns], label="δ-mem state (serialized)")
        ax.set_yscale("log")
        ax.set_xlabel("turn")
        ax.set_ylabel("bytes per thread")
        ax.legend()
        ax.set_title("What a thread keeps between turns")
        written.append(_save(fig, folder / f"state_vs_kv{suffix}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_results(results: dict, folder: Path) -> list[Path]:
    """Write ``results{-quick}.json``, ``results{-quick}.md`` and the PNGs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    label = machine_label(results["machine"])
    for rows in results["sections"].values():
        for row in rows if isinstance(rows, list) else [r for part in rows.values() for r in part]:
            row["machine"] = label
    suffix = "-quick" if results["quick"] else ""
    json_path = folder / f"results{suffix}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    md_path = folder / f"results{suffix}.md"
    md_path.write_text(to_markdown(results) + "\n", encoding="utf-8")
    return [json_path, md_path, *plot(results, folder, suffix)]


LOAD_COLUMNS = [
    ("workers", "workers"),
    ("turns_run", "turns run"),
    ("not_run", "not run"),
    ("errors", "errors"),
    ("wall_s", "wall s"),
    ("throughput_turns_s", "turns/s"),
    ("x_vs_1_worker", "× 1 worker"),
    ("p50_ms", "p50 ms"),
    ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("cpu_ms_per_turn", "CPU ms / turn"),
    ("forward_ms_per_turn", "of it forward ms"),
    ("worker_cores", "cores: workers"),
    ("postgres_cores", "cores: Postgres"),
    ("cpu_busy_cores", "cores busy (all)"),
]


def load_table(results: dict) -> str:
    """The load run's rows (one per worker count) as a markdown table."""
    return table(results["runs"], LOAD_COLUMNS, results["machine"])


def load_markdown(results: dict) -> str:
    """A load run as markdown: what ran, where, the table, and any error messages."""
    machine = results["machine"]
    lines = [
        f"# Load run: {results['threads']} threads × {results['turns']} turns, model {results['model']}, Postgres",
        "",
        f"Command: `{results['command']}` (commit {results.get('commit') or 'unknown'})  ",
        f"Machine: {machine_label(machine)}; CPU affinity {machine['cpu_affinity']}, one torch thread per worker "
        f"process; PostgreSQL {machine.get('postgres', '?')} on {results['database']}.  ",
        f"Replies up to {results['max_new_tokens']} new tokens; no turn starts after {results['max_seconds']:g} s "
        f"per run; the run's threads {'were deleted afterwards' if results['cleanup'] else 'were kept'}.",
        "",
        "Latency: wall clock of one `graph.ainvoke` (read checkpoint, write pass, decode, write checkpoint), "
        "waiting behind the worker's other in-flight turns included. Throughput: completed turns / wall time from "
        "the common start to the last turn's end. Cores: CPU time / wall time over the same interval, of the worker "
        "processes, of the Postgres server, and machine-wide (all processes, ours and anyone else's). "
        "CPU ms / turn: the workers' CPU time per completed turn, and the part of it inside the backbone's forward "
        "calls.",
        "",
        load_table(results),
        "",
    ]
    for row in results["runs"]:
        if row["error_messages"]:
            lines += [f"Errors with {row['workers']} worker(s) (first {len(row['error_messages'])}):", ""]
            lines += [f"- `{message}`" for message in row["error_messages"]] + [""]
    return "\n".join(lines)


def write_load_results(results: dict, folder: Path, name: str = "load") -> list[Path]:
    """Write ``{name}.json`` and ``{name}.md`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    md_path = folder / f"{name}.md"
    md_path.write_text(load_markdown(results) + "\n", encoding="utf-8")
    return [json_path, md_path]
