"""Rows of docs/research/memory-training.md from training checkpoints and their logs.

Usage: python scripts/run_rows.py RUN_DIR LOG_FILE [RUN_DIR LOG_FILE ...]
A log file holds the ``scripts/closed_dev_ce.py`` JSON lines of that run (window 2, and --notes).
"""

import json
import sys
from pathlib import Path


def objective(config: dict) -> str:
    parts = ["CE"]
    if config["contrastive_weight"]:
        parts.append(f"+{config['contrastive_weight']:g}·margin({config['margin']:g})")
    if config.get("read_notes"):
        parts.append(f"notes {config['read_notes']:g} (+{config.get('prompt_weight', 1):g}·CE wrong)")
    if config.get("distill_weight"):
        parts.append(f"+{config['distill_weight']:g}·KL(teacher, top {config.get('distill_top_k', 64)})")
    if config.get("first_token_weight", 1.0) != 1.0:
        parts.append(f"first answer token ×{config['first_token_weight']:g}")
    parts.append(f"window {config.get('read_window', 0)}")
    if config.get("write_cache"):
        until = config.get("write_cache_until", 1.0)
        parts.append("cached write" + ("" if until == 1.0 else f" ({until:g} of steps)"))
    elif not config["detach_backbone"]:
        parts.append("full backprop")
    return ", ".join(parts)


def row(run: Path, log: Path) -> str:
    state = json.loads((run / "trainer_state.json").read_text())
    config, history = state["config"], state["history"]
    memory = config["memory"]
    last = history[-20:]
    gap = sum(h["gap"] for h in last if h["gap"] is not None) / max(1, len(last))
    dev = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"adapter"')]
    plain = next((d for d in dev if not d.get("notes")), None)
    notes = next((d for d in dev if d.get("notes")), None)

    def pct(d, key):
        return f"{100 * d[key]:.0f}%" if d and key in d else "–"

    def ce(d, key):
        return f"{d[key]:.2f}" if d and key in d else "–"

    strategy = {"segment": "SSW", "token": "TSW", "multi": "MSW"}[memory["write"]]
    gates = f"{memory['forget_gate']}, β {memory['beta_bias_init']:g}"
    if memory["forget_gate"] == "separate":
        gates += f", λ {memory['lambda_bias_init']:g}"
    cells = [
        run.name,
        f"{strategy} ({gates})",
        objective(config),
        f"{config['lr']:g}",
        f"{memory['correction_gain']:g}",
        str(state["step"]),
        str(state["step"] * config["batch_size"] * config["accumulation"]),
        f"{state['seconds'] / 60:.1f}",
        f"{gap:+.2f}",
        f"{ce(plain, 'ce_right')} / {ce(plain, 'ce_wrong')}",
        f"{pct(plain, 'first_token_acc_right')} / {pct(plain, 'first_token_acc_wrong')}",
        f"{ce(notes, 'ce_right')} / {ce(notes, 'ce_empty_memory')}",
        f"{pct(notes, 'first_token_acc_right')} / {pct(notes, 'first_token_acc_empty_memory')}",
    ]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    args = sys.argv[1:]
    for run, log in zip(args[::2], args[1::2]):
        print(row(Path(run), Path(log)))
