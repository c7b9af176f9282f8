"""The layer boundary holds by test: core/ and serving/ import with LangChain and LangGraph unavailable."""

import subprocess
import sys
from pathlib import Path

import deltamem_agents

PACKAGE = Path(deltamem_agents.__file__).parent

BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith(("langchain", "langgraph")):
            raise ImportError(f"blocked by the import-boundary test: {name}")
        return None

sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 1)
"""


def modules_under(*subpackages: str) -> list[str]:
    names = ["deltamem_agents"]
    for sub in subpackages:
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_core_and_serving_import_without_langchain_or_langgraph():
    modules = modules_under("core", "serving")
    assert len(modules) > 15  # every module of both layers, not an empty glob
    done = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"imported {len(modules)}" in done.stdout


def test_the_blocker_really_blocks_the_outer_layer():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER, "deltamem_agents.agents.chat"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "blocked by the import-boundary test" in done.stderr


def test_the_top_level_names_of_the_outer_layer_load_on_first_use():
    import deltamem_agents
    from deltamem_agents.agents.chat import DeltaMemChat
    from deltamem_agents.agents.middleware import DeltaMemMiddleware

    assert deltamem_agents.DeltaMemChat is DeltaMemChat and deltamem_agents.DeltaMemMiddleware is DeltaMemMiddleware
    from deltamem_agents import build_agent  # noqa: F401

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER + "\nimport deltamem_agents\nprint(deltamem_agents.MemoryState)",
            "deltamem_agents",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr  # the package itself still imports with LangChain blocked
