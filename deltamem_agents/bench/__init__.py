"""``deltamem bench``: scan speed, backbone overhead, per-turn latency vs replay, and checkpoint cost.

One concept per module: ``machine`` (where it ran), ``timing`` (clocks, alternation, medians, peak memory),
``scan``, ``overhead``, ``turns``, ``checkpoints`` (the four sections), ``report`` (JSON, markdown, PNG) and
``runner`` (``run_bench``, what the command calls). ``load`` is ``deltamem bench-load``: a bounded load run of
worker processes over one shared Postgres database (``run_load``).
"""

from deltamem_agents.bench.runner import SECTIONS, run_bench

__all__ = ["SECTIONS", "run_bench"]
