"""Every import path that README.md and docs/ name exists: `from deltamem_agents.x import y` lines and dotted
`deltamem_agents.x.y` names resolve to a module or an attribute."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "plugins").rglob("*.md"))]
FROM_IMPORT = re.compile(r"from (deltamem_agents[\w.]*) import \(?([\w, ]+)")
DOTTED = re.compile(r"\bdeltamem_agents(?:\.\w+)+")


def resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_documented_import_path_resolves():
    missing, seen = [], 0
    for path in DOCS:
        text = path.read_text()
        for module, names in FROM_IMPORT.findall(text):
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                if name:
                    seen += 1
                    if not resolve(f"{module}.{name}"):
                        missing.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
        for dotted in DOTTED.findall(text):
            dotted = dotted.rstrip(".")
            if dotted.endswith((".py", ".json", ".safetensors", ".md")) or dotted == "deltamem_agents.scan_kernels":
                continue  # file names and the entry-point group name
            seen += 1
            if not resolve(dotted):
                missing.append(f"{path.relative_to(ROOT)}: {dotted}")
    assert seen > 20
    assert not missing, "\n".join(missing)
