"""δ-mem for ``langchain.agents.create_agent``: a middleware that keeps the thread's memory in the agent state.

    from langchain.agents import create_agent
    agent = create_agent(chat, tools, middleware=[DeltaMemMiddleware()], checkpointer=saver)

The middleware adds two channels to the agent's state, ``memory`` (the state bytes) and ``written`` (the ids of
the messages already written), hands them to the ``DeltaMemChat`` for each model call and stores what the call
returns, so the checkpointer saves memory and messages together (resume, time travel, forks, ``delete_thread``),
as in ``build_agent``. Because the memory is a function of the written messages, the same conversation gives the
same memory bytes in both.
"""

from typing import Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain.agents.middleware.types import ExtendedModelResponse
from langgraph.types import Command

from deltamem_agents.agents.chat import CURRENT_TURN, DeltaMemChat, TurnIO
from deltamem_agents.core.errors import DeltaMemError


class DeltaMemAgentState(AgentState):
    """The agent state plus the thread's memory bytes and the ids of the messages written into them."""

    memory: NotRequired[bytes | None]
    written: NotRequired[list[str]]


class DeltaMemMiddleware(AgentMiddleware):
    """Gives the agent's ``DeltaMemChat`` the thread's memory for each model call and saves the new memory in the
    agent state (see the module docstring). The agent's model must be a ``DeltaMemChat``."""

    state_schema = DeltaMemAgentState

    def _turn(self, request) -> TurnIO:
        model = getattr(request.model, "bound", request.model)
        if not isinstance(model, DeltaMemChat):
            raise DeltaMemError(
                f"DeltaMemMiddleware needs a DeltaMemChat as the agent's model, got {type(model).__name__}; pass "
                "create_agent(DeltaMemChat.from_backbone(), ...) or remove the middleware"
            )
        state = request.state
        return TurnIO(memory=state.get("memory"), written=tuple(state.get("written") or ()))

    @staticmethod
    def _result(io: TurnIO, response) -> ExtendedModelResponse:
        if io.new_memory is None:
            raise DeltaMemError("the model call did not run a δ-mem turn: was the model replaced by a middleware?")
        update: dict[str, Any] = {"memory": io.new_memory, "written": list(io.new_written)}
        return ExtendedModelResponse(model_response=response, command=Command(update=update))

    def wrap_model_call(self, request, handler):
        io = self._turn(request)
        token = CURRENT_TURN.set(io)
        try:
            response = handler(request)
        finally:
            CURRENT_TURN.reset(token)
        return self._result(io, response)

    async def awrap_model_call(self, request, handler):
        io = self._turn(request)
        token = CURRENT_TURN.set(io)
        try:
            response = await handler(request)
        finally:
            CURRENT_TURN.reset(token)
        return self._result(io, response)
