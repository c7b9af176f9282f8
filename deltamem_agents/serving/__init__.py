"""Framework-free serving on chat dicts: engine (write pass, decoding), templating, retrieval, tool grammar.
Nothing here imports LangChain or LangGraph (a test checks)."""
