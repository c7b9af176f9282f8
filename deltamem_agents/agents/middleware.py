"""δ-mem for ``langchain.agents.create_agent``: a middleware that checks the agent's model is a ``DeltaMemChat``.

    from langchain.agents import create_agent
    agent = create_agent(chat, tools, middleware=[DeltaMemMiddleware()], checkpointer=saver)

The memory needs no agent state: ``DeltaMemChat`` finds it from the messages of each model call (a
content-addressed store keyed by them), so the agent's checkpoints (resume, time travel, forks) give the memory
of exactly their messages, as in ``build_agent``. What the middleware adds is the loud failure: a model call that
does not reach a ``DeltaMemChat`` (another model, or one that another middleware swapped in) raises instead of
silently running without memory. Delete a thread with ``forget_thread(checkpointer, chat, thread_id)``.
"""

from langchain.agents.middleware import AgentMiddleware

from deltamem_agents.agents.chat import DeltaMemChat
from deltamem_agents.core.errors import DeltaMemError


class DeltaMemMiddleware(AgentMiddleware):
    """Refuses a model call whose model is not a ``DeltaMemChat`` (see the module docstring)."""

    @staticmethod
    def _check(request) -> None:
        model = getattr(request.model, "bound", request.model)
        if not isinstance(model, DeltaMemChat):
            raise DeltaMemError(
                f"DeltaMemMiddleware needs a DeltaMemChat as the agent's model, got {type(model).__name__}; pass "
                "create_agent(DeltaMemChat.from_backbone(), ...) or remove the middleware"
            )

    def wrap_model_call(self, request, handler):
        self._check(request)
        return handler(request)

    async def awrap_model_call(self, request, handler):
        self._check(request)
        return await handler(request)
