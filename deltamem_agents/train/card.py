"""Training curves of a checkpoint (loss, answer CE, control gap, mean write gate) as a PNG and a markdown
summary, for model cards."""

import json
from pathlib import Path


def smooth(values: list[float], window: int = 25) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(checkpoint_dir: str | Path, path: str | Path, window: int = 25) -> Path:
    """Plot the per-step history stored in ``trainer_state.json`` of a training checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())
    history = state["history"]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(steps, smooth([h["ce"] for h in history], window), label="answer CE, right memory")
    axes[0].plot(steps, smooth([h["ce"] + (h["gap"] or 0.0) for h in history], window), label="answer CE, wrong memory")
    axes[0].set_title("answer cross-entropy (moving avg)")
    axes[0].legend()
    axes[1].plot(steps, smooth([h["gap"] or 0.0 for h in history], window))
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_title("control gap = CE(wrong) - CE(right)")
    axes[2].plot(steps, [h["beta"] for h in history])
    axes[2].set_title("mean write gate β")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_table(checkpoint_dir: str | Path, every: int = 100) -> str:
    """Markdown rows: step, mean loss / CE / gap over the preceding ``every`` steps."""
    history = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())["history"]
    lines = ["| steps | loss | answer CE (right) | control gap | mean β |", "|---|---|---|---|---|"]
    for start in range(0, len(history), every):
        part = history[start : start + every]
        gaps = [h["gap"] for h in part if h["gap"] is not None]
        lines.append(
            f"| {part[0]['step']}-{part[-1]['step']} | {sum(h['loss'] for h in part) / len(part):.3f} | "
            f"{sum(h['ce'] for h in part) / len(part):.3f} | {sum(gaps) / max(1, len(gaps)):+.4f} | "
            f"{part[-1]['beta']:.3f} |"
        )
    return "\n".join(lines)
