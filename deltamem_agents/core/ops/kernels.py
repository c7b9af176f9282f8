"""GPU scan kernels from optional plugins, found by entry point (group ``deltamem_agents.scan_kernels``).

The core never imports a plugin by name. A kernel has ``delta_scan_recurrent``'s signature and contract (extra
keyword arguments such as ``chunk_size`` are passed and may be ignored) and runs on CUDA tensors. The memory layer
uses the first kernel found for calls on CUDA with writes on; ``DELTAMEM_SCAN_KERNEL=none`` disables them, and
``DELTAMEM_SCAN_KERNEL=<name>`` picks one.
"""

import os
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points

GROUP = "deltamem_agents.scan_kernels"
_cache: dict[str, Callable | None] = {}


def gpu_scan_kernel() -> Callable | None:
    """The selected plugin scan for CUDA tensors, or None (then the built-in chunked scan runs)."""
    choice = os.environ.get("DELTAMEM_SCAN_KERNEL", "")
    if choice == "none":
        return None
    if choice not in _cache:
        _cache[choice] = _load(choice)
    return _cache[choice]


def _load(choice: str) -> Callable | None:
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if choice and entry.name != choice:
            continue
        try:
            return entry.load()
        except Exception as err:  # a broken plugin must not break the core
            warnings.warn(f"δ-mem scan plugin {entry.name!r} failed to load: {err}", stacklevel=3)
    return None
