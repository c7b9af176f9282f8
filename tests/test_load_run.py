"""``deltamem bench-load``: a small bounded load run over Postgres completes without errors, reports its numbers
and removes its threads; an unreachable database is a one-line error with exit code 2.

The load test needs a server: ``bash scripts/start-postgres.sh`` prints the URL; set DELTAMEM_TEST_POSTGRES_URL
to it. Skipped without it.
"""

import json
import os
import time
from urllib.parse import urlsplit

import pytest

from deltamem_agents.apps.cli import main
from deltamem_agents.bench.load import redact_url, user_text
from deltamem_agents.bench.machine import CpuSampler
from deltamem_agents.bench.timing import median, percentile

URL = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not URL, reason="set DELTAMEM_TEST_POSTGRES_URL (bash scripts/start-postgres.sh)")
FIELDS = {
    "workers",
    "threads",
    "turns",
    "turns_run",
    "not_run",
    "errors",
    "error_messages",
    "wall_s",
    "throughput_turns_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "threads_deleted",
}


@needs_postgres
def test_small_load_run_completes_reports_and_deletes_its_threads(tmp_path, capsys):
    import psycopg

    code = main(
        ["bench-load", "--url", URL, "--workers", "2", "--threads", "6", "--turns", "2", "--max-seconds", "300"]
        + ["--model", "tiny", "--out", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "load.json").read_text())
    assert {"command", "commit", "machine", "model", "run_id", "threads", "turns", "runs"} <= set(results)
    assert results["model"] == "tiny" and results["machine"]["cpu"] and results["machine"]["postgres"]
    password = urlsplit(URL).password
    assert not password or f":{password}@" not in json.dumps(results)  # the password is redacted
    [run] = results["runs"]
    assert FIELDS <= set(run)
    assert run["errors"] == 0, run["error_messages"]
    assert run["workers"] == 2 and run["turns_run"] == 12 and run["not_run"] == 0
    assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert run["throughput_turns_s"] > 0 and run["wall_s"] > 0
    assert run["threads_deleted"] == 6
    assert "| workers |" in (tmp_path / "load.md").read_text()
    assert "| workers |" in capsys.readouterr().out  # the table is printed too
    pattern = results["run_id"] + "-%"
    with psycopg.connect(URL) as conn:
        for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
            count = conn.execute(f"SELECT count(*) FROM {table} WHERE thread_id LIKE %s", (pattern,)).fetchone()[0]
            assert count == 0, table


@needs_postgres
def test_max_seconds_bounds_the_run_and_kept_threads_stay_in_the_database(tmp_path):
    from langgraph.checkpoint.postgres import PostgresSaver

    from deltamem_agents.agents.store import PostgresMemoryStore

    code = main(
        ["bench-load", "--url", URL, "--workers", "1", "--threads", "2", "--turns", "400", "--max-seconds", "1"]
        + ["--out", str(tmp_path), "--name", "bounded", "--keep-threads"]
    )
    assert code == 0
    results = json.loads((tmp_path / "bounded.json").read_text())
    [run] = results["runs"]
    assert run["errors"] == 0 and run["not_run"] > 0 and run["threads_deleted"] == 0
    assert run["turns_run"] + run["not_run"] == 800
    assert run["wall_s"] < 30  # turns in flight at the deadline finish; no new ones start
    threads = [f"{results['run_id']}-w1-{i:04d}" for i in range(2)]
    store = PostgresMemoryStore(URL)
    with PostgresSaver.from_conn_string(URL) as saver:
        for thread in threads:
            state = saver.get_tuple({"configurable": {"thread_id": thread}})
            assert state is not None and state.checkpoint["channel_values"]["messages"], thread
            assert store.keys_of(thread), thread  # its memory states are in the database too
            saver.delete_thread(thread)
            store.forget(thread)


def test_unreachable_database_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    code = main(["bench-load", "--url", "postgresql://x:secret@127.0.0.1:1/nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot use the Postgres database at postgresql://x:***@127.0.0.1:1/nope")
    assert "secret" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "scripts/start-postgres.sh" in err
    assert not list(tmp_path.iterdir())  # nothing was written


def test_missing_url_and_bad_workers_are_errors_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.delenv("DELTAMEM_POSTGRES_URL", raising=False)
    assert main(["bench-load"]) == 2
    assert "DELTAMEM_POSTGRES_URL" in capsys.readouterr().err
    assert main(["bench-load", "--url", "postgresql://x@127.0.0.1:1/n", "--workers", "1,two"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["bench-load", "--url", "postgresql://x@127.0.0.1:1/n", "--workers", "0"]) == 2
    assert "workers >= 1" in capsys.readouterr().err


def test_helpers():
    assert redact_url("postgresql://u:p4ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("host=h user=u password=p4ss dbname=db") == "host=h user=u password=*** dbname=db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == median(values) == 3.0
    assert (
        percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0 and percentile(values, 90) == pytest.approx(4.6)
    )
    assert user_text("t-0001", 1) != user_text("t-0001", 2) and user_text("t-0001", 1).isascii()


def test_cpu_sampler_averages_cores_and_ignores_dips_of_exiting_backends():
    sampler = CpuSampler()
    sampler.samples = [(100.0, 10.0, 5.0), (101.0, 11.5, 5.2), (102.0, 13.0, 5.4), (102.2, 13.2, 5.1)]
    cores = sampler.cores_between(100.0, 102.2)  # the last Postgres value dipped: a backend not yet reaped
    assert cores["cpu_busy_cores"] == pytest.approx(3.2 / 2.2)
    assert cores["postgres_cores"] == pytest.approx(0.4 / 2.2)
    with CpuSampler(interval_s=0.05) as live:
        time.sleep(0.2)
    assert len(live.samples) >= 3 and live.cores_between(live.samples[0][0], live.samples[-1][0])["cpu_busy_cores"] >= 0
