"""deltamem-agents: δ-mem online memory for local transformers models, for long-running agents."""

from deltamem_agents.core.attach import attach_memory, detach_memory, has_memory, memory_parameters
from deltamem_agents.core.cache import DeltaMemCache, memory_state_of
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.core.errors import (
    AdapterError,
    BackboneError,
    ConfigError,
    DeltaMemError,
    MemoryStateError,
    UnsupportedModelError,
)
from deltamem_agents.core.state import MemoryState

# The LangChain layer, imported on first use so that the core imports without LangChain or LangGraph installed.
_LAZY = {
    "DeltaMemChat": "deltamem_agents.agents.chat",
    "DeltaMemState": "deltamem_agents.agents.graph",
    "build_agent": "deltamem_agents.agents.graph",
    "build_chatbot": "deltamem_agents.agents.graph",
    "memory_node": "deltamem_agents.agents.graph",
    "forget_thread": "deltamem_agents.agents.graph",
    "aforget_thread": "deltamem_agents.agents.graph",
    "InMemoryStore": "deltamem_agents.agents.store",
    "SqliteMemoryStore": "deltamem_agents.agents.store",
    "PostgresMemoryStore": "deltamem_agents.agents.store",
    "DeltaMemMiddleware": "deltamem_agents.agents.middleware",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltamem_agents' has no attribute {name!r}")


def new_cache(model, state: MemoryState | None = None, writes: bool = True) -> DeltaMemCache:
    """A fresh KV cache carrying ``state`` (or the empty memory) for ``model(...)`` / ``model.generate(...)``."""
    return DeltaMemCache(model, state=state, writes=writes)


def adapter_fingerprint(model) -> str:
    """The fingerprint every MemoryState written by this model's adapter carries."""
    from deltamem_agents.core.attach import attachment_of

    return attachment_of(model).fingerprint(model)


__all__ = [
    "DeltaMemChat",
    "DeltaMemMiddleware",
    "DeltaMemState",
    "build_agent",
    "build_chatbot",
    "memory_node",
    "forget_thread",
    "aforget_thread",
    "InMemoryStore",
    "SqliteMemoryStore",
    "PostgresMemoryStore",
    "AdapterError",
    "BackboneError",
    "ConfigError",
    "DeltaMemCache",
    "DeltaMemConfig",
    "DeltaMemError",
    "MemoryState",
    "MemoryStateError",
    "UnsupportedModelError",
    "adapter_fingerprint",
    "attach_memory",
    "detach_memory",
    "has_memory",
    "memory_parameters",
    "memory_state_of",
    "new_cache",
]
