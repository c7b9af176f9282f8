"""run_bench: load the backbone, run the selected sections, print tables and write the result files."""

import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from deltamem_agents.bench.machine import machine_info
from deltamem_agents.bench.report import write_results
from deltamem_agents.bench.timing import max_rss_bytes, use_clock
from deltamem_agents.core.state import MemoryState

SECTIONS = ("costs", "scan", "overhead", "turns", "checkpoints")


def run_bench(
    out_dir: str | Path = "docs/benchmarks",
    quick: bool = False,
    sections: tuple[str, ...] = SECTIONS,
    backbone: str | None = None,
    threads: int | None = 1,
    model=None,
    tokenizer=None,
    replay_every: int | None = None,
    turns: int | None = None,
    command: str | None = None,
) -> dict:
    """Run the benchmarks and write ``results[-quick].{json,md}`` and PNG plots into ``out_dir``.

    Args:
        quick: short sizes, for a smoke run (minutes instead of tens of minutes).
        sections: any of ``costs`` (the issue-14 ratios side by side), ``scan``, ``overhead``, ``turns``,
            ``checkpoints``.
        backbone: what :func:`load_backbone` loads (default: the embedded SmolLM2-135M); ignored if ``model``.
        threads: torch intra-op threads (1 by default: pin the process with ``taskset`` and compare ratios).
        model, tokenizer: an already loaded causal LM and tokenizer (tests pass a tiny random model).
        replay_every, turns: see :func:`deltamem_agents.bench.turns.bench_turns`.

    Returns:
        The results dict that was written.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if threads:
        torch.set_num_threads(threads)
    needs_model = {"costs", "overhead", "turns"} & set(sections)
    if model is None and needs_model:
        from deltamem_agents.models.backbone_zoo import DEFAULT_BACKBONE, load_backbone

        model, tokenizer = load_backbone(backbone or DEFAULT_BACKBONE)
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    machine = machine_info(device)
    machine["clock"] = use_clock(device, torch.get_num_threads())
    results = {
        "command": command or "deltamem " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "quick": quick,
        "machine": machine,
        "backbone": getattr(getattr(model, "config", None), "_name_or_path", None) or backbone,
        "commit": git_commit(),
        "sections": {},
    }
    print(f"machine: {machine}", flush=True)
    started = time.perf_counter()
    states: dict[str, MemoryState] = {}
    if "costs" in sections:
        from deltamem_agents.bench.costs import bench_costs, costs_table

        print("costs: what memory costs, ratios side by side (memory / plain; scan: chunked / token loop)", flush=True)
        results["sections"]["costs"] = bench_costs(model, device, quick)
        print(f"machine: {machine}\n" + costs_table(results["sections"]["costs"]), flush=True)
    if "scan" in sections:
        from deltamem_agents.bench.scan import bench_scan

        print("scan: chunked vs token loop", flush=True)
        results["sections"]["scan"] = bench_scan(device, quick)
    if "overhead" in sections:
        from deltamem_agents.bench.overhead import bench_overhead

        print("overhead: plain backbone vs TSW / MSW memory", flush=True)
        results["sections"]["overhead"] = bench_overhead(model, device, quick)
    if "turns" in sections:
        from deltamem_agents.bench.turns import bench_turns

        print("turns: stateless replay vs kept KV vs δ-mem", flush=True)
        per_turn, summary = bench_turns(model, tokenizer, device, quick, turns=turns, replay_every=replay_every)
        results["sections"]["turns"] = {"per_turn": per_turn, "summary": summary}
    if "checkpoints" in sections:
        from deltamem_agents.bench.checkpoints import bench_checkpoints

        print("checkpoints: SqliteSaver put / get_tuple", flush=True)
        layers = model.config.num_hidden_layers if model is not None else 30
        for kind, heads in (("TSW", 1), ("MSW", 4)):
            g = torch.Generator().manual_seed(heads)
            states[kind] = MemoryState(torch.randn(layers, 1, heads, 8, 8, generator=g), "bench", tuple(range(layers)))
        results["sections"]["checkpoints"] = bench_checkpoints(states, quick)
    results["seconds"] = time.perf_counter() - started
    results["max_rss_bytes"] = max_rss_bytes()
    files = write_results(results, Path(out_dir))
    print(f"done in {results['seconds']:.0f} s; wrote " + ", ".join(str(f) for f in files), flush=True)
    return results


def git_commit() -> str | None:
    """The checked-out commit of the package's repository, when it is a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None
