"""``--adapter default``: the shipped adapter of a backbone that passes rungs 1 and 4 of the memory ladder
(docs/evaluation.md), or, while none does, the zero-init identity (the model equals the backbone).

Rung 1: closed facts, δ-mem >= 0.8 x full history and δ-mem - control >= +30 points (lower CI end > 0);
rung 4: δ-mem + BM25 vs BM25 alone, upper CI end of the difference >= 0. An adapter is listed here only with a
command that shows both (docs/adapters/).
"""

from pathlib import Path

from deltamem_agents.core.adapter import SHIPPED_ADAPTERS, load_adapter
from deltamem_agents.core.attach import attach_memory, has_memory
from deltamem_agents.core.config import IDENTITY_CONFIG
from deltamem_agents.models import DEFAULT_BACKBONE

DEFAULT = "default"
# backbone -> shipped adapter folder name (under deltamem_agents/adapters), None: no adapter passes yet
DEFAULT_ADAPTERS: dict[str, str | None] = {DEFAULT_BACKBONE: None}


def default_adapter_path(backbone: str) -> Path | None:
    """The shipped default adapter folder of ``backbone``, or None when no adapter passes rungs 1 and 4."""
    name = DEFAULT_ADAPTERS.get(backbone)
    return None if name is None else SHIPPED_ADAPTERS / name


def identity_message(backbone: str) -> str:
    return (
        f"--adapter default: no shipped adapter for {backbone} passes rungs 1 and 4 of the memory ladder "
        "(docs/evaluation.md); using the zero-init identity (corrections 0: the model equals the backbone)"
    )


def apply_adapter(model, adapter: str | None, backbone: str, log=print) -> str | None:
    """Load ``adapter`` into ``model``: a folder, ``"default"`` (see the module docstring) or None (nothing).

    Returns the folder loaded, or None when nothing was (``"default"`` without a passing adapter attaches the
    zero-init identity and logs why)."""
    if adapter is None:
        return None
    if adapter != DEFAULT:
        load_adapter(model, adapter)
        return adapter
    path = default_adapter_path(backbone)
    if path is None:
        log(identity_message(backbone))
        if not has_memory(model):
            attach_memory(model, IDENTITY_CONFIG)
        return None
    load_adapter(model, path)
    return str(path)
