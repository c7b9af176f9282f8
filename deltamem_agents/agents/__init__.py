"""The LangChain / LangGraph layer: DeltaMemChat, graph helpers, thread-state stores."""
