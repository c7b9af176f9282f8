"""Aggregate evaluation records: per-method means with bootstrap CIs, paired bootstrap CIs of per-question
differences between methods, a markdown table, a JSON file and a PNG plot."""

import json
import random
from pathlib import Path

METRICS = ("f1", "em", "contains")
PAIRS = (
    ("delta", "window"),
    ("delta", "delta_control"),
    ("delta_bm25", "bm25"),
    ("bm25", "window"),
    ("full", "window"),
)


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def summarize(records: list[dict]) -> dict:
    """Per task and method: n, mean and CI of each metric, mean prompt tokens and latency; paired differences."""
    summary = {}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        methods = sorted({r["method"] for r in rows}, key=_order)
        per_method = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            entry = {"n": len(mine)}
            for metric in METRICS:
                values = [r[metric] for r in mine]
                entry[metric] = sum(values) / len(values)
                entry[f"{metric}_ci"] = bootstrap_ci(values)
            entry["prompt_tokens"] = sum(r["prompt_tokens"] for r in mine) / len(mine)
            entry["latency_s"] = sum(r["latency_s"] for r in mine) / len(mine)
            per_method[method] = entry
        keyed = {(r["method"], r["conversation"], r["question_index"]): r for r in rows}
        differences = {}
        for a, b in PAIRS:
            if a not in per_method or b not in per_method:
                continue
            common = [k[1:] for k in keyed if k[0] == a and (b, *k[1:]) in keyed]
            for metric in METRICS:
                diffs = [keyed[(a, *k)][metric] - keyed[(b, *k)][metric] for k in common]
                if diffs:
                    differences[f"{a} - {b} ({metric})"] = {
                        "n": len(diffs),
                        "mean": sum(diffs) / len(diffs),
                        "ci": bootstrap_ci(diffs),
                    }
        summary[task] = {"methods": per_method, "paired_differences": differences}
    return summary


def markdown(summary: dict) -> str:
    """Tables: one per task with every method, then the paired differences."""
    lines = []
    for task, data in summary.items():
        lines += [
            f"### {task}",
            "",
            "| method | n | F1 | EM | contains | prompt tokens | latency s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, e in data["methods"].items():
            cells = [f"{100 * e[m]:.1f} [{100 * e[m + '_ci'][0]:.1f}, {100 * e[m + '_ci'][1]:.1f}]" for m in METRICS]
            lines.append(
                f"| {method} | {e['n']} | "
                + " | ".join(cells)
                + f" | {e['prompt_tokens']:.0f} | {e['latency_s']:.2f} |"
            )
        if data["paired_differences"]:
            lines += ["", "| paired difference (points) | n | mean | 95% CI |", "|---|---|---|---|"]
            for name, d in data["paired_differences"].items():
                low, high = d["ci"]
                lines.append(f"| {name} | {d['n']} | {100 * d['mean']:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path, metric: str = "contains") -> Path:
    """Bar chart of ``metric`` per method and task with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = list(summary[task]["methods"])
        means = [100 * summary[task]["methods"][m][metric] for m in methods]
        cis = [summary[task]["methods"][m][f"{metric}_ci"] for m in methods]
        errors = [
            [mean - 100 * lo for mean, (lo, _) in zip(means, cis)],
            [100 * hi - mean for mean, (_, hi) in zip(means, cis)],
        ]
        ax.bar(
            methods,
            means,
            yerr=errors,
            capsize=3,
            color=["#888" if not m.startswith("delta") else "#2a6" for m in methods],
        )
        ax.set_title(f"{task}: {metric} (%), 95% CI")
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: list[dict], directory: str | Path, name: str = "eval", meta: dict | None = None) -> dict:
    """Write ``{name}.json`` (summary + records), ``{name}.md`` and ``{name}.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    records = [redact(r) for r in records]
    (directory / f"{name}.json").write_text(
        json.dumps({"meta": meta or {}, "summary": summary, "records": records}, indent=1)
    )
    (directory / f"{name}.md").write_text(markdown(summary))
    plot(summary, directory / f"{name}.png")
    return summary


REDACTED_TASKS = ("locomo",)


def redact(record: dict) -> dict:
    """LoCoMo's text (CC BY-NC) stays out of committed reports: drop question, answer and prediction; keep ids,
    category and scores. The full records stay in the (ignored) cache directory."""
    if record.get("task") not in REDACTED_TASKS:
        return record
    return {k: v for k, v in record.items() if k not in ("question", "answer", "prediction")}


def _order(method: str) -> int:
    order = ["window", "full", "bm25", "delta", "delta_bm25", "delta_control"]
    return order.index(method) if method in order else len(order)
