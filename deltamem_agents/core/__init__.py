"""The δ-mem core: torch + transformers only (ops, the memory layer, attach + hooks, backbones, cache and
carrier, MemoryState, adapter IO). Nothing here imports LangChain or LangGraph (a test checks)."""
