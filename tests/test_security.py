"""Source scans: nothing is unpickled (one permitted torch.load with weights_only=True) and SQL only uses
placeholders."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOURCES = [p for folder in ("deltamem_agents", "examples", "plugins") for p in (ROOT / folder).rglob("*.py")]
MODULES = r"(pickle|cPickle|_pickle|dill|joblib|marshal|shelve|cloudpickle)"
UNPICKLING = re.compile(
    rf"^\s*(import|from)\s+{MODULES}\b|\b{MODULES}\.(load|loads|Unpickler)\b|torch\.load\(|load_state_dict_from_url"
)


def test_no_unpickling_except_the_reference_importer():
    hits = []
    for path in SOURCES:
        for line in path.read_text().splitlines():
            if UNPICKLING.search(line):
                hits.append((path.relative_to(ROOT).as_posix(), line.strip()))
    assert hits == [
        (
            "deltamem_agents/core/adapter.py",
            'raw = torch.load(weights_path, map_location="cpu", weights_only=True)  # the one permitted unpickling',
        )
    ]


def test_sql_uses_placeholders_only():
    formatted_sql = re.compile(r"""(execute|query)\(\s*f["'].*(\{(?!self\.TABLE\})[^}]*\})""")
    concatenated = re.compile(r"""(execute|query)\([^)]*["']\s*\+|%\s*\(""")
    for path in SOURCES:
        text = path.read_text()
        for line in text.splitlines():
            assert not formatted_sql.search(line), f"{path}: SQL built with an f-string: {line.strip()}"
            if "execute(" in line or "query(" in line:
                assert not concatenated.search(line), f"{path}: SQL built by concatenation: {line.strip()}"
