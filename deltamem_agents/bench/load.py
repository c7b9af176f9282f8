"""A bounded load run: W worker processes serve N conversation threads of M user turns each, all threads in
flight at once, over ONE shared Postgres checkpoint database, through
``build_chatbot(DeltaMemChat(...), checkpointer=AsyncPostgresSaver)``.

Layout, as in a deployment (docs/deployment.md): each worker is a process of its own (``python -m
deltamem_agents.bench.load --worker``: a fresh interpreter, no forked torch or connection state) with one torch
thread, its own backbone and its own database connection. Thread ``i`` of the run goes to worker ``i % W``. A
thread's turns run one after the other (turn 2 starts when turn 1's checkpoint is written); all of a worker's threads
run concurrently.

Why asyncio inside a worker (``AsyncPostgresSaver`` + ``graph.ainvoke``) and not a thread pool over the sync
``PostgresSaver``:

- ``DeltaMemChat.ainvoke`` already moves the model work off the event loop (``asyncio.to_thread`` per decoding
  step) and the engine's lock serialises forward steps, so a pool of OS threads would not compute more; it would
  only add threads contending for the GIL and the lock;
- checkpoint reads and writes are network I/O, which a coroutine waits for without holding a thread: every
  thread of the worker is in flight at the cost of one coroutine, and the database round trips of some turns
  overlap the model work of others;
- it is how an async server (LangGraph's server, FastAPI) serves a graph, so the numbers carry over.

One connection per worker: AsyncPostgresSaver runs its queries one at a time behind its own lock even over a
connection pool, so a pool would add connections, not concurrency.

What is measured:

- latency: the wall clock of one ``graph.ainvoke`` (one user turn: read the thread's latest checkpoint, write
  pass, decode, write the new checkpoint), including the time the turn waits behind the worker's other in-flight
  turns; it is latency under this load, not the latency of a turn alone;
- throughput: completed turns / wall time from the common start until the last turn ended (model loading, a
  warm-up call and the clean-up are outside it);
- errors: a failed turn is counted (the first few messages are kept) and the thread goes on with its next turn;
- CPU over the same interval: cores used by the workers (their CPU time / wall time), by the local Postgres
  server, and busy machine-wide (so a machine shared with other work shows as such); and the workers' CPU time
  per completed turn, in all and inside the backbone's forward calls (the rest: checkpoint serialisation and the
  database client, LangGraph, LangChain, tokenisation, retrieval).

Bounded: no turn starts after ``max_seconds`` (those are reported as "not run"); a worker that has not reported
``max_seconds + GRACE_S`` after the start is terminated and its turns are counted as errors.

Between processes only JSON lines cross, over two pipes (:class:`JsonChannel`): the worker's spec, the start
signal and its results. No pickling: not even ``multiprocessing``'s, which pickles the process object for the
child.
"""

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import torch

from deltamem_agents.bench.machine import CpuSampler, machine_info
from deltamem_agents.bench.report import load_table, write_load_results
from deltamem_agents.bench.runner import git_commit
from deltamem_agents.bench.timing import median, percentile
from deltamem_agents.core.errors import LoadRunError
from deltamem_agents.models import TINY_BACKBONE

TINY = TINY_BACKBONE
GRACE_S = 120.0  # after max_seconds: time for the turns in flight to finish and for the workers to report
LOAD_TIMEOUT_S = 900.0  # for every worker to load its backbone and connect
ERROR_MESSAGES_KEPT = 5
TOPICS = (
    "my order 4411 has not arrived yet",
    "the printer on the third floor is jammed again",
    "I want to move my meeting to Thursday at 10",
    "please remember that my dog is called Pixel",
    "the VPN drops every few minutes since Monday",
    "what was the number I gave you earlier?",
    "my invoice shows the wrong address",
)


def user_text(thread: str, turn: int) -> str:
    """The deterministic ASCII message of ``thread``'s ``turn`` (the tiny backbone's tokenizer is ASCII)."""
    topic = TOPICS[(sum(map(ord, thread)) + turn) % len(TOPICS)]
    return f"Hi, this is {thread[-4:]} again (message {turn}): {topic}. Can you help?"


def build_chat(model: str, max_new_tokens: int):
    """The chat model a worker serves: ``"tiny"`` (:mod:`deltamem_agents.models.tiny_backbone`, seed 0) or anything
    :func:`deltamem_agents.models.backbone_zoo.load_backbone` loads (e.g. ``"smollm2-135m-instruct"``)."""
    from deltamem_agents.agents.chat import DeltaMemChat

    if model == TINY:
        from deltamem_agents.models.tiny_backbone import tiny_engine

        return DeltaMemChat(engine=tiny_engine(seed=0), max_new_tokens=max_new_tokens, model_name=TINY)
    return DeltaMemChat.from_backbone(model, max_new_tokens=max_new_tokens)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (URL or key=value form), for messages and result files."""
    url = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", url)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---- worker process -----------------------------------------------------------------------------------------


class JsonChannel:
    """JSON messages, one per line, in over one pipe file descriptor and out over another."""

    def __init__(self, read_fd: int, write_fd: int):
        self._read_fd, self._write_fd = read_fd, write_fd
        self._buffer = b""

    def fileno(self) -> int:
        """The reading end, for ``multiprocessing.connection.wait``."""
        return self._read_fd

    def send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self._write_fd, data) :]

    def has_message(self) -> bool:
        """A whole message is already buffered (``wait`` on the descriptor would not see it)."""
        return b"\n" in self._buffer

    def recv(self) -> dict:
        """The next message; EOFError when the other end closed its side first."""
        while b"\n" not in self._buffer:
            chunk = os.read(self._read_fd, 1 << 16)
            if not chunk:
                raise EOFError("the other process closed the channel")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class _Tally:
    """What one worker saw: latencies of completed turns, errors, turns not started, when its last turn ended."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    not_run: int = 0
    last_end: float = 0.0

    def error(self, thread: str, turn: int, err: BaseException) -> None:
        self.errors += 1
        if len(self.error_messages) < ERROR_MESSAGES_KEPT:
            self.error_messages.append(f"{thread} turn {turn}: {type(err).__name__}: {_one_line(err)}")


async def _conversation(graph, thread: str, turns: int, deadline: float, tally: _Tally) -> None:
    """Run ``thread``'s turns one after the other; none starts after ``deadline`` (epoch seconds)."""
    from langchain_core.messages import HumanMessage

    config = {"configurable": {"thread_id": thread}}
    for turn in range(1, turns + 1):
        if time.time() >= deadline:
            tally.not_run += turns - turn + 1
            return
        message = HumanMessage(user_text(thread, turn), id=f"{thread}-u{turn}")
        start = time.perf_counter()
        try:
            await graph.ainvoke({"messages": [message]}, config)
        except Exception as err:  # a failed turn is counted, not fatal
            tally.error(thread, turn, err)
        else:
            tally.latencies_s.append(time.perf_counter() - start)
        tally.last_end = max(tally.last_end, time.time())


class _ForwardClock:
    """CPU seconds spent inside the backbone's forward calls (hooks on the top module). Forward calls of one
    engine never overlap (the engine lock) and run on the calling thread (one torch thread), so that thread's CPU
    time covers them, whatever else the machine runs."""

    def __init__(self, model):
        self.seconds = 0.0
        self._started = 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        self._started = time.thread_time()

    def _after(self, module, args, output) -> None:
        self.seconds += time.thread_time() - self._started


async def _serve(conn: JsonChannel, spec: dict, chat, load_s: float) -> None:
    from langchain_core.messages import HumanMessage
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from deltamem_agents.agents.graph import aforget_thread, build_chatbot
    from deltamem_agents.agents.store import PostgresMemoryStore

    async with AsyncPostgresSaver.from_conn_string(spec["url"]) as saver:
        chat.store = PostgresMemoryStore(spec["url"])  # memory states beside the checkpoints, as in a deployment
        graph = build_chatbot(chat, checkpointer=saver)
        await chat.ainvoke([HumanMessage("warm up")])  # first-call costs off the clock; no thread, no checkpoint
        conn.send({"ready": True, "load_s": load_s})
        go = await asyncio.to_thread(conn.recv)
        if "deadline" not in go:
            return  # the run was called off (another worker failed to load)
        tally, forward = _Tally(), _ForwardClock(chat.engine.model)
        cpu_start = time.process_time()  # this process, all its threads
        await asyncio.gather(*(_conversation(graph, t, spec["turns"], go["deadline"], tally) for t in spec["threads"]))
        cpu_s = time.process_time() - cpu_start
        deleted, cleanup_error = 0, None
        if spec["cleanup"]:
            try:
                for thread in spec["threads"]:
                    await aforget_thread(saver, chat, thread)  # checkpoints and memory states
                    deleted += 1
            except Exception as err:
                cleanup_error = f"{type(err).__name__}: {_one_line(err)}"
        result = {
            "latencies_s": tally.latencies_s,
            "errors": tally.errors,
            "error_messages": tally.error_messages,
            "not_run": tally.not_run,
            "last_end": tally.last_end or None,
            "cpu_s": cpu_s,
            "forward_s": forward.seconds,
            "threads_deleted": deleted,
            "cleanup_error": cleanup_error,
        }
        conn.send({"result": result})


def _worker_main(conn: JsonChannel) -> None:
    """Entry point of a worker process: read its spec, load the model, connect, report ready, wait for the start,
    serve its threads, delete them, report the results. Every failure is reported to the parent as
    ``{"error": ...}``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar per worker
    spec = conn.recv()
    name = f"worker {spec['index']}"
    try:
        started = time.perf_counter()
        chat = build_chat(spec["model"], spec["max_new_tokens"])
        load_s = time.perf_counter() - started
    except Exception as err:
        conn.send({"error": f"{name} could not load model {spec['model']!r}: {type(err).__name__}: {_one_line(err)}"})
        conn.close()
        return
    try:
        asyncio.run(_serve(conn, spec, chat, load_s))
    except Exception as err:
        try:
            conn.send({"error": f"{name} failed: {type(err).__name__}: {_one_line(err)}"})
        except OSError:
            pass  # the parent is gone
    finally:
        conn.close()


# ---- parent ---------------------------------------------------------------------------------------------------


def check_database(url: str) -> str:
    """Connect to ``url``, create or migrate LangGraph's checkpoint tables once (``AsyncPostgresSaver.setup``)
    and return the server's version. Raises :class:`LoadRunError` with a one-line reason when that fails."""
    try:
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    except ImportError as err:
        raise LoadRunError(
            f"the load run needs the postgres extra ({err.name} is missing): pip install -e '.[postgres]'"
        ) from None

    async def setup() -> None:
        async with AsyncPostgresSaver.from_conn_string(url) as saver:
            await saver.setup()

    try:
        with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        asyncio.run(setup())
    except psycopg.Error as err:
        raise LoadRunError(
            f"cannot use the Postgres database at {redact_url(url)} ({_one_line(err)}); start a server with "
            "`bash scripts/start-postgres.sh` (it prints the URL) and pass it with --url or $DELTAMEM_POSTGRES_URL"
        ) from None
    return str(version)


@dataclass
class _Worker:
    name: str
    process: subprocess.Popen
    conn: JsonChannel
    spec: dict


def _start_worker(spec: dict) -> _Worker:
    """Start ``python -m deltamem_agents.bench.load --worker`` with two pipes to it and send it ``spec``."""
    to_child_read, to_child_write = os.pipe()
    from_child_read, from_child_write = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "deltamem_agents.bench.load", "--worker", str(to_child_read)]
    process = subprocess.Popen(
        [*command, str(from_child_write)], pass_fds=(to_child_read, from_child_write), env=env, stdin=subprocess.DEVNULL
    )
    os.close(to_child_read)  # the child's ends: only the child holds them now, so its death is our EOF
    os.close(from_child_write)
    worker = _Worker(f"worker {spec['index']}", process, JsonChannel(from_child_read, to_child_write), spec)
    worker.conn.send(spec)
    return worker


def _receive(worker: _Worker, timeout: float) -> dict | None:
    """The worker's next message; ``{"error": ...}`` if it died without one; None after ``timeout`` seconds."""
    if not worker.conn.has_message() and not wait([worker.conn], timeout=max(timeout, 0.0)):
        return None
    try:
        return worker.conn.recv()
    except (EOFError, OSError, ValueError):
        pass
    try:
        code = worker.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = "none yet"
    return {"error": f"{worker.name} exited (code {code}) without reporting"}


def run_once(
    url: str,
    workers: int,
    threads: int,
    turns: int,
    max_seconds: float,
    model: str = TINY,
    max_new_tokens: int = 16,
    cleanup: bool = True,
    run_id: str | None = None,
) -> dict:
    """One load run with ``workers`` processes; returns its row (latency percentiles in ms, throughput, errors,
    turns run / not run, wall time, slowest model load, threads deleted). Thread ids are
    ``{run_id}-w{workers}-{i}``. Raises :class:`LoadRunError` when a worker cannot load or connect."""
    run_id = run_id or f"load-{uuid.uuid4().hex[:8]}"
    names = [f"{run_id}-w{workers}-{i:04d}" for i in range(threads)]
    procs: list[_Worker] = []
    try:
        for index in range(workers):
            spec = {
                "index": index,
                "url": url,
                "model": model,
                "threads": names[index::workers],
                "turns": turns,
                "max_new_tokens": max_new_tokens,
                "cleanup": cleanup,
            }
            procs.append(_start_worker(spec))
        load_s, load_until = [], time.monotonic() + LOAD_TIMEOUT_S
        for worker in procs:
            message = _receive(worker, load_until - time.monotonic())
            if message is None:
                raise LoadRunError(f"{worker.name} did not load model {model!r} within {LOAD_TIMEOUT_S:.0f} s")
            if "error" in message:
                raise LoadRunError(message["error"])
            load_s.append(message["load_s"])
        with CpuSampler() as cpu:
            start = time.time()
            for worker in procs:
                worker.conn.send({"deadline": start + max_seconds})
            results, lost = [], []
            report_until = time.monotonic() + max_seconds + GRACE_S
            for worker in procs:
                message = _receive(worker, report_until - time.monotonic())
                if message is not None and "result" in message:
                    results.append(message["result"])
                    continue
                why = message["error"] if message else f"{worker.name} did not report in max_seconds + {GRACE_S:.0f} s"
                lost.append((why, len(worker.spec["threads"]) * turns))
                worker.process.terminate()
    finally:
        for worker in procs:
            if worker.process.poll() is None:
                try:
                    worker.conn.send({"abort": True})
                except OSError:
                    pass
            _stop(worker.process)
            worker.conn.close()
    return _row(workers, threads, turns, start, load_s, results, lost, cpu)


def _stop(process: subprocess.Popen) -> None:
    """Wait for a worker to end by itself, then terminate it."""
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _row(
    workers: int, threads: int, turns: int, start: float, load_s: list, results: list, lost: list, cpu: CpuSampler
) -> dict:
    latencies = [s for r in results for s in r["latencies_s"]]
    errors = sum(r["errors"] for r in results) + sum(n for _, n in lost)
    messages = [m for r in results for m in r["error_messages"]] + [why for why, _ in lost]
    messages += [f"clean-up: {r['cleanup_error']}" for r in results if r["cleanup_error"]]
    ends = [r["last_end"] for r in results if r["last_end"]]
    cpu_s = sum(r["cpu_s"] for r in results)
    wall_s = (max(ends) - start) if ends else float("nan")
    ms = [s * 1e3 for s in latencies]
    return {
        "workers": workers,
        "threads": threads,
        "turns": turns,
        "turns_planned": threads * turns,
        "turns_run": len(latencies) + errors,
        "turns_ok": len(latencies),
        "not_run": sum(r["not_run"] for r in results),
        "errors": errors,
        "error_messages": messages[:ERROR_MESSAGES_KEPT],
        "wall_s": wall_s,
        "throughput_turns_s": len(latencies) / wall_s if ends and wall_s > 0 else 0.0,
        "p50_ms": median(ms),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        "cpu_ms_per_turn": cpu_s * 1e3 / len(latencies) if latencies else float("nan"),
        "forward_ms_per_turn": sum(r["forward_s"] for r in results) * 1e3 / len(latencies)
        if latencies
        else float("nan"),
        "worker_cores": cpu_s / wall_s if ends and wall_s > 0 else float("nan"),
        **cpu.cores_between(start, max(ends) if ends else start),
        "model_load_s": max(load_s) if load_s else float("nan"),
        "threads_deleted": sum(r["threads_deleted"] for r in results),
    }


def run_load(
    url: str,
    workers: tuple[int, ...] | list[int] = (4,),
    threads: int = 100,
    turns: int = 5,
    max_seconds: float = 600.0,
    model: str = TINY,
    out_dir: str | Path = "docs/benchmarks",
    cleanup: bool = True,
    max_new_tokens: int = 16,
    name: str | None = None,
    command: str | None = None,
) -> dict:
    """Run the load once per entry of ``workers`` (e.g. ``(1, 2, 4)`` for scaling, one after the other, each
    with its own ``max_seconds`` bound), print a markdown table and write ``{name}.json`` and ``{name}.md`` into
    ``out_dir`` (``name``: ``load`` for the tiny model, else ``load-{model}`` with odd characters as dashes).

    Args:
        url: Postgres URL of the shared checkpoint database (its tables are created if missing).
        workers: worker process counts, one run each.
        threads, turns: conversation threads per run and user turns per thread.
        max_seconds: per run, no turn starts after this many seconds (they are reported as not run).
        model: ``"tiny"`` (random, gibberish replies; measures the machinery) or a ``load_backbone`` name.
        cleanup: delete the run's threads from the database afterwards.
        max_new_tokens: reply length limit per turn.

    Returns:
        The results dict that was written (``runs``: one row per worker count).
    """
    workers = list(workers)
    if not workers or any(w < 1 for w in workers) or threads < 1 or turns < 1 or max_seconds <= 0:
        raise LoadRunError(
            f"need workers >= 1 (got {workers}), threads >= 1 (got {threads}), turns >= 1 (got {turns}) and "
            f"max_seconds > 0 (got {max_seconds})"
        )
    if max_new_tokens < 1:
        raise LoadRunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    server = check_database(url)
    prepare_s = _prepare_model(model)
    run_id = f"load-{uuid.uuid4().hex[:8]}"
    machine = machine_info(torch.device("cpu"))
    machine["torch_threads"] = 1  # per worker process
    machine["postgres"] = server
    results = {
        "command": redact_url(command or "deltamem " + " ".join(shlex.quote(a) for a in sys.argv[1:])),
        "commit": git_commit(),
        "machine": machine,
        "model": model,
        "database": redact_url(url),
        "run_id": run_id,
        "threads": threads,
        "turns": turns,
        "max_seconds": max_seconds,
        "max_new_tokens": max_new_tokens,
        "cleanup": cleanup,
        "model_prepare_s": prepare_s,
        "runs": [],
    }
    print(f"machine: {machine}", flush=True)
    for count in workers:
        print(f"load run {run_id}: {count} worker(s), {threads} threads x {turns} turns, model {model}", flush=True)
        row = run_once(url, count, threads, turns, max_seconds, model, max_new_tokens, cleanup, run_id)
        results["runs"].append(row)
        print(
            f"  {row['turns_ok']} turns in {row['wall_s']:.1f} s: {row['throughput_turns_s']:.2f} turns/s, p50 "
            f"{row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, {row['errors']} errors, {row['not_run']} not run",
            flush=True,
        )
    single = next((r for r in results["runs"] if r["workers"] == 1), None)
    for row in results["runs"]:
        base = single["throughput_turns_s"] if single else 0.0
        row["x_vs_1_worker"] = row["throughput_turns_s"] / base if base > 0 else float("nan")
    name = name or ("load" if model == TINY else "load-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-."))
    files = write_load_results(results, Path(out_dir), name)
    print(load_table(results), flush=True)
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return results


def _prepare_model(model: str) -> float:
    """Convert an embedded backbone once, here, before the workers start (else each would convert it)."""
    from deltamem_agents.models.backbone_zoo import EMBEDDED, embedded_folder

    started = time.perf_counter()
    if model in EMBEDDED:
        embedded_folder(model)
    return time.perf_counter() - started


__all__ = ["GRACE_S", "TINY", "JsonChannel", "build_chat", "check_database", "redact_url", "run_load", "run_once"]
__all__ += ["user_text"]

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(JsonChannel(int(sys.argv[2]), int(sys.argv[3])))
