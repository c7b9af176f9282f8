"""Every Python snippet in README.md and docs/ runs as written.

The snippets of one page run in order in one fresh interpreter (as a reader pastes them), in an empty working
directory. ``DELTAMEM_BACKBONE=tiny`` makes ``from_backbone()`` / ``load_backbone()`` load the tiny random
backbone, so the fast test checks the code paths; the slow test runs the pages that load a backbone on the
embedded SmolLM2-135M. Pages that use ``DELTAMEM_POSTGRES_URL`` get the test database's URL, or are skipped
without one.
"""

import os
import re
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "examples" / "README.md"]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LOADS_A_BACKBONE = re.compile(r"from_backbone\(|load_backbone\(")


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text())


def pages_with_snippets() -> list[Path]:
    return [page for page in PAGES if page.is_file() and snippets(page)]


@contextmanager
def fresh_postgres_schema():
    """A URL of the test database whose search path is a new, empty schema (dropped afterwards), so a page's
    threads never meet those of an earlier run."""
    import psycopg

    url = os.environ.get("DELTAMEM_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("this page needs PostgreSQL: set DELTAMEM_TEST_POSTGRES_URL")
    schema = f"snippets_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"create schema {schema}")
    try:
        yield url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"drop schema {schema} cascade")


def run_page(page: Path, tmp_path: Path, backbone: str | None, timeout: int) -> subprocess.CompletedProcess:
    code = "\n\n".join(snippets(page))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_NUM_THREADS": "1"}
    env.pop("DELTAMEM_BACKBONE", None)
    if backbone:
        env["DELTAMEM_BACKBONE"] = backbone
    run = [sys.executable, "-c", code]
    if "DELTAMEM_POSTGRES_URL" not in code:
        return subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    with fresh_postgres_schema() as url:
        env["DELTAMEM_POSTGRES_URL"] = url
        return subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_docs_have_snippets_and_no_other_python_fences():
    assert {p.name for p in pages_with_snippets()} >= {"README.md", "quickstart-langgraph.md"}
    for page in PAGES:
        if page.is_file():  # a ```py or ```python3 fence would escape this test
            assert not re.search(r"^```(py|python3|pycon)\s*$", page.read_text(), re.M), page


@pytest.mark.parametrize("page", pages_with_snippets(), ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run_on_the_tiny_backbone(page, tmp_path):
    result = run_page(page, tmp_path, backbone="tiny", timeout=600)
    assert result.returncode == 0, f"{page.relative_to(ROOT)} failed:\n{result.stderr[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [p for p in pages_with_snippets() if LOADS_A_BACKBONE.search("\n".join(snippets(p)))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_snippets_run_on_the_embedded_backbone(page, tmp_path):
    result = run_page(page, tmp_path, backbone=None, timeout=900)
    assert result.returncode == 0, f"{page.relative_to(ROOT)} failed:\n{result.stderr[-4000:]}"
