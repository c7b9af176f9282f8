"""Section d: a memory channel in LangGraph's SqliteSaver: bytes per checkpoint and put / get latency.

The checkpoint holds what the DeltaMemChat graph state holds: a ``memory`` channel with
``MemoryState.to_bytes()`` (plus a small ``written`` list), saved with ``saver.put`` and read back with
``saver.get_tuple``, one thread, each checkpoint the child of the previous one (as a graph run makes them).
"""

import sqlite3
import tempfile
import time
from pathlib import Path

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.sqlite import SqliteSaver

from deltamem_agents.bench.timing import median
from deltamem_agents.core.state import MemoryState


def bench_checkpoints(states: dict[str, MemoryState], quick: bool = False, count: int | None = None) -> list[dict]:
    """One row per state kind (e.g. TSW, MSW): checkpoint bytes and median put / get_tuple latency in ms."""
    count = count or (20 if quick else 300)
    rows = []
    for kind, state in states.items():
        data = state.to_bytes()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "checkpoints.sqlite"
            with SqliteSaver.from_conn_string(str(path)) as saver:
                saver.setup()
                config = {"configurable": {"thread_id": f"bench-{kind}", "checkpoint_ns": ""}}
                put_s, get_s, latest_get_s = [], [], []
                for step in range(count + 5):  # the first 5 are warm-up
                    checkpoint = empty_checkpoint()
                    checkpoint["channel_values"] = {"memory": data, "written": [f"m{i}" for i in range(step % 8)]}
                    checkpoint["channel_versions"] = {"memory": step + 1, "written": step + 1}
                    start = time.perf_counter()
                    config = saver.put(config, checkpoint, {"source": "loop", "step": step}, {"memory": step + 1})
                    put = time.perf_counter() - start
                    start = time.perf_counter()
                    loaded = saver.get_tuple(config)
                    get = time.perf_counter() - start
                    latest = {"configurable": {"thread_id": f"bench-{kind}", "checkpoint_ns": ""}}
                    start = time.perf_counter()
                    saver.get_tuple(latest)
                    latest_get = time.perf_counter() - start
                    if step >= 5:
                        put_s.append(put)
                        get_s.append(get)
                        latest_get_s.append(latest_get)
                restored = MemoryState.from_bytes(loaded.checkpoint["channel_values"]["memory"])
                if not restored.equal(state):
                    raise RuntimeError("the memory state read back from SqliteSaver differs from the one saved")
            with sqlite3.connect(path) as conn:
                blob, meta = conn.execute(
                    "SELECT avg(length(checkpoint)), avg(length(metadata)) FROM checkpoints"
                ).fetchone()
            file_bytes = sum(p.stat().st_size for p in Path(folder).iterdir())
        rows.append(
            {
                "state": kind,
                "state_bytes": len(data),
                "checkpoint_blob_bytes": int(blob),
                "metadata_bytes": int(meta),
                "db_bytes_per_checkpoint": file_bytes / (count + 5),
                "put_ms": median(put_s) * 1e3,
                "get_by_id_ms": median(get_s) * 1e3,
                "get_latest_ms": median(latest_get_s) * 1e3,
                "checkpoints": count,
            }
        )
        row = rows[-1]
        print(
            f"  checkpoints {kind}: state {row['state_bytes']} B, checkpoint {row['checkpoint_blob_bytes']} B, "
            f"put {row['put_ms']:.2f} ms, get {row['get_by_id_ms']:.2f} ms, get latest {row['get_latest_ms']:.2f} ms",
            flush=True,
        )
    return rows
