"""DeltaMemChat: a LangChain chat model over a local backbone with δ-mem, keeping one memory per thread.

Each call is one turn of the protocol in ``deltamem_agents.agents.turn``: older messages not yet written go into the
memory (write pass), and the reply is decoded from a bounded prompt (system + notes + window) reading the
memory with writes off. Where the memory lives:
  - in our LangGraph node (``deltamem_agents.agents.graph``): the checkpointed ``memory`` channel, passed in and out
    through the ``deltamem_turn`` keyword (a TurnIO);
  - standalone with ``config={"configurable": {"thread_id": ...}}``: the chat model's ``store``;
  - standalone without a thread id: a fresh memory for this call only.
"""

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from deltamem_agents.agents.store import InMemoryStore, ThreadMemory
from deltamem_agents.agents.turn import WindowPolicy, plan_turn
from deltamem_agents.core.state import MemoryState
from deltamem_agents.models import DEFAULT_BACKBONE
from deltamem_agents.serving.engine import GenerationDone, GenerationSettings, MemoryEngine
from deltamem_agents.serving.repetition import CopyBias, RepetitionSettings
from deltamem_agents.serving.span_copy import SpanCopy
from deltamem_agents.serving.thread_locks import ThreadLocks
from deltamem_agents.serving.tool_choice import choose_action
from deltamem_agents.serving.tool_grammar import (
    ARGUMENTS_HEAD,
    REPLY_HEAD,
    allowed_actions,
    compile_envelope,
    envelope_schema,
    ground,
    instructions,
    parse_envelope,
    partial_reply_text,
    preselect,
    tool_specs,
)

log = logging.getLogger(__name__)
TURN_KWARG = "deltamem_turn"
THREAD_LOCKS = ThreadLocks()  # keyed by (store, thread id)
THREAD_KWARG = "deltamem_thread_id"
VALUES_KWARG = "deltamem_live_values"  # {tool: {argument: values}} from value_providers, resolved per call
EMBEDDED_BACKBONE = "smollm2-135m-instruct"


@dataclass
class TurnIO:
    """Memory in and out of one turn, for graph nodes: set ``memory`` / ``written`` before the call; after it,
    ``new_memory`` / ``new_written`` hold what the node must store in its state."""

    memory: bytes | None = None
    written: tuple[str, ...] = ()
    new_memory: bytes | None = None
    new_written: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    tokens_written: int = 0


# The TurnIO of the model call running in this context, for callers that cannot pass keywords to the model
# (the create_agent middleware); it stays out of the call's invocation params and cache keys.
CURRENT_TURN: ContextVar[TurnIO | None] = ContextVar("deltamem_current_turn", default=None)


@dataclass
class _Turn:
    state: MemoryState
    prompt_ids: torch.Tensor
    grammar: Any
    specs: list
    tokens_written: int
    notes: list[str]
    choice: Any = None  # the ActionChoice of likelihood tool choice, if it ran
    copy_tokens: tuple[int, ...] = ()  # token ids of the newest user message (copy bias of tool arguments)
    request: str = ""  # the newest user message (the source of span arguments)
    span_arguments: frozenset[str] = frozenset()  # string arguments of the decoded tools that copy a span of it
    result_tokens: tuple[int, ...] = ()  # token ids of the tool result the reply follows (result copy bias)


class DeltaMemChat(BaseChatModel):
    """Chat model over a local transformers backbone with a δ-mem memory per thread.

    Build it with :meth:`from_backbone` (embedded default backbone, optional adapter folder) or from a
    :class:`MemoryEngine`. Supports invoke / ainvoke / stream / astream / batch / abatch, ``bind_tools`` (tool
    calls decoded under a JSON grammar, so every call parses and validates), ``with_structured_output``, and
    ``stop``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed`` per call. ``tool_preselect=k`` offers the
    model only the k bound tools that best match the newest user message (BM25 over names and descriptions),
    which helps small models choose.

    Tool choice and replies (docs/tool-choice.md):
      - ``tool_scoring="likelihood"`` (the default of :meth:`from_backbone` for the embedded backbone): under
        ``tool_choice="auto"`` / ``"any"`` the backbone scores every allowed action (each tool, and the plain
        reply under ``auto``) by its own log-likelihood, then decodes the envelope of the best one under the
        grammar (it still writes the arguments or the reply). ``"grammar"``: the model picks the action while
        decoding the envelope. ``reply_bias`` is added to the reply's score.
      - ``value_providers``: ``{tool name: {argument: provider}}``; each turn ``provider(config)`` (the run's
        RunnableConfig) returns the values that argument may take now, and the grammar admits only those; a
        tool with a provider that returns nothing is not offered that turn.
      - ``repetition``: repetition control of reply text (no-repeat n-grams, a penalty, a stop when a sentence
        repeats; inside tool arguments only the n-gram rule); None turns it off. ``max_new_tokens`` defaults to
        160.
      - ``copy_bias``: added to the logits of the newest user message's tokens while tool arguments are decoded
        (2.0 by default for the embedded backbone), so stated numbers and names are copied.
      - ``span_arguments``: ``{tool name: [string argument, ...]}`` whose values must be a span of the newest
        user message (word-aligned, case-insensitive; ``serving.span_copy``), or ``"strings"`` for every free
        string argument (no enum) of every bound tool (the embedded backbone's default; ``{}`` turns it off: a
        value that is not in the request, such as a date for "tomorrow", cannot be written then). The model still
        picks the span.
      - ``result_copy_bias``: after a tool result, added to the logits of the result's tokens while the reply
        text is decoded, so the reply restates what the tool said (the model still writes it).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any = Field(exclude=True)
    window_messages: int = 4
    window_tokens: int = 768
    recall: Literal["latent", "latent+retrieval"] = "latent+retrieval"
    notes_tokens: int = 192
    max_new_tokens: int = 160
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    store: Any = Field(default_factory=InMemoryStore, exclude=True)
    model_name: str = "deltamem"
    tool_preselect: int | None = None
    tool_scoring: Literal["grammar", "likelihood"] = "grammar"
    reply_bias: float = 0.0
    value_providers: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True)
    repetition: RepetitionSettings | None = Field(default_factory=RepetitionSettings)
    copy_bias: float = 0.0
    span_arguments: dict[str, list[str]] | Literal["strings"] = Field(default_factory=dict)
    result_copy_bias: float = 0.0

    @classmethod
    def from_backbone(
        cls, backbone: str = DEFAULT_BACKBONE, adapter: str | None = None, device=None, **kwargs
    ) -> "DeltaMemChat":
        """Load ``backbone`` (see ``load_backbone``) and, if given, a saved adapter folder."""
        from deltamem_agents.core.adapter import load_adapter
        from deltamem_agents.models.backbone_zoo import load_backbone

        model, tokenizer = load_backbone(backbone, device=device)
        if adapter is not None:
            load_adapter(model, adapter)
        if backbone == EMBEDDED_BACKBONE:
            kwargs.setdefault("tool_scoring", "likelihood")
            kwargs.setdefault("copy_bias", 2.0)
            kwargs.setdefault("reply_bias", 1.5)  # tuned on the tune half of the request set (docs/tool-choice.md)
            kwargs.setdefault("result_copy_bias", 2.0)  # set by hand (no tool-result items in the request set)
            kwargs.setdefault("span_arguments", "strings")  # tune half: 22/31 -> 27/31 stated values exact
        return cls(engine=MemoryEngine(model, tokenizer), model_name=backbone, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "deltamem-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "recall": self.recall, "window_messages": self.window_messages}

    def _get_ls_params(self, stop=None, **kwargs):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "deltamem"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        return params

    @property
    def window(self) -> WindowPolicy:
        return WindowPolicy(self.window_messages, self.window_tokens, self.recall, self.notes_tokens)

    def forget(self, thread_id: str) -> None:
        """Remove a standalone thread's memory (state bytes and written ids) from :attr:`store`; the next call
        with this thread id starts from an empty memory. Inside a LangGraph graph the memory lives in the
        checkpoints: use the checkpointer's ``delete_thread(thread_id)`` there."""
        with self._hold_thread(thread_id):  # not in the middle of a turn of the thread
            self.store.delete(str(thread_id))

    def _hold_thread(self, thread_id):
        """Hold the lock of one standalone thread of this chat model's store."""
        return THREAD_LOCKS.hold((id(self.store), str(thread_id)))

    def get_num_tokens(self, text: str) -> int:
        """Token count from the backbone's real tokenizer."""
        return self.engine.count_tokens(text)

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any):
        """Bind tools (functions, pydantic models, BaseTools or OpenAI tool dicts); ``tool_choice`` is "auto"
        (default: reply or call), "any"/"required" (must call), "none", or a tool name."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        allowed_actions(tool_specs(formatted), tool_choice)  # validate names and tool_choice now
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # ---- one turn -------------------------------------------------------------------------------------------

    def _begin_turn(self, messages: list[BaseMessage], kwargs: dict) -> tuple[_Turn, Any]:
        """Resolve the memory, run the write pass, persist it, and build the read-pass prompt and grammar."""
        io: TurnIO | None = kwargs.get(TURN_KWARG) or CURRENT_TURN.get()
        thread_id = None if io is not None else kwargs.get(THREAD_KWARG)
        lock = self._hold_thread(thread_id) if thread_id is not None else nullcontext()
        with lock:  # two concurrent turns of the same standalone thread must not both write its memory
            if io is not None:
                memory, written, step = io.memory, tuple(io.written), 0
            elif thread_id is not None:
                saved = self.store.load(str(thread_id)) or ThreadMemory(None)
                memory, written, step = saved.state, saved.written, saved.step
            else:
                memory, written, step = None, (), 0
            fingerprint = self.engine.fingerprint()
            state = MemoryState.from_bytes(memory, fingerprint, self.engine.memory_layers) if memory else None
            specs, allow_reply, extra = self._tools(kwargs, _newest_user_text(messages))
            plan = plan_turn(messages, written, self.window, self.engine.count_tokens, extra_system=extra)
            state, tokens_written = self.engine.write(state, plan.to_write)
            data = state.to_bytes()
            if io is not None:
                io.new_memory, io.new_written = data, plan.written_ids
                io.notes, io.tokens_written = plan.notes, tokens_written
            elif thread_id is not None:
                self.store.save(str(thread_id), ThreadMemory(data, plan.written_ids, step + 1), fingerprint)
        prompt_ids = self.engine.render_prompt(plan.prompt)
        grammar, choice = None, None
        if kwargs.get("tools"):
            decode_specs, decode_reply = specs, allow_reply
            if self.tool_scoring == "likelihood" and len(specs) + allow_reply > 1:
                choice = choose_action(
                    self.engine, state, _without(plan.prompt, extra), specs, allow_reply, prompt_ids, self.reply_bias
                )
                decode_specs = [s for s in specs if s.name == choice.action]
                decode_reply = not decode_specs
                # the envelope is decoded with the chosen action's instructions only (nothing else is allowed)
                narrowed = _with_system_text(_without(plan.prompt, extra), instructions(decode_specs, decode_reply))
                prompt_ids = self.engine.render_prompt(narrowed)
            schema = envelope_schema(decode_specs, decode_reply)
            grammar = compile_envelope(self.engine.tokenizer, self.engine.model.config.vocab_size, schema)
        else:
            decode_specs = []
        request = _newest_user_text(messages)
        tokenizer = self.engine.tokenizer
        copy_tokens = _copy_tokens(tokenizer, request) if grammar else ()
        spans = frozenset(self._span_arguments(decode_specs)) if grammar else frozenset()
        result = messages[-1].text if grammar is not None and isinstance(messages[-1], ToolMessage) else ""
        result_tokens = tuple(tokenizer(result, add_special_tokens=False)["input_ids"]) if result else ()
        turn = _Turn(state, prompt_ids, grammar, specs, tokens_written, plan.notes, choice, copy_tokens)
        return dataclasses.replace(turn, request=request, span_arguments=spans, result_tokens=result_tokens), io

    def _span_arguments(self, specs) -> list[str]:
        """The string arguments of ``specs`` that copy a span of the request (``span_arguments``)."""
        out = []
        for spec in specs:
            properties = spec.parameters.get("properties") or {}
            if self.span_arguments == "strings":
                out += [k for k, v in properties.items() if v.get("type") == "string" and "enum" not in v]
            else:
                out += [k for k in self.span_arguments.get(spec.name, ()) if k in properties]
        return out

    def _tools(self, kwargs: dict, request: str) -> tuple[list, bool, str]:
        """The tools offered this turn (after tool_choice, grounding and preselection), whether a reply is
        allowed, and the tool instructions for the system prompt."""
        tools = kwargs.get("tools") or []
        if not tools:
            return [], True, ""
        specs, allow_reply = allowed_actions(tool_specs(tools), kwargs.get("tool_choice"))
        if kwargs.get(VALUES_KWARG):
            specs = ground(specs, kwargs[VALUES_KWARG])
            if not specs and not allow_reply:
                allow_reply = True  # nothing can be called with live values: the model must say so itself
        if self.tool_preselect and specs:
            specs = preselect(specs, request, self.tool_preselect)
        return specs, allow_reply, instructions(specs, allow_reply)

    def _settings(self, stop: list[str] | None, kwargs: dict, turn: "_Turn | None" = None) -> GenerationSettings:
        stops = tuple((stop or []) + (self.stop or []))
        under_grammar = turn is not None and turn.grammar is not None
        copy_tokens = turn.copy_tokens if turn is not None else ()
        controls = []
        if under_grammar and turn.span_arguments and turn.request:  # a hard constraint: before the soft ones
            controls.append(SpanCopy(turn.request, turn.span_arguments, self.engine.tokenizer))
        if self.repetition is not None and not under_grammar:
            controls.append(self.repetition)
        elif self.repetition is not None:
            controls.append(dataclasses.replace(self.repetition, after=REPLY_HEAD))  # the reply text
            # inside a call's arguments: no looping values, but no stop (a cut-off call would be lost)
            controls.append(
                dataclasses.replace(self.repetition, after=ARGUMENTS_HEAD, penalty=1.0, stop_on_cycle=False)
            )
        if under_grammar and self.copy_bias and copy_tokens:
            controls.append(CopyBias(frozenset(copy_tokens), self.copy_bias, after=ARGUMENTS_HEAD))
        if under_grammar and self.result_copy_bias and turn.result_tokens:
            controls.append(CopyBias(frozenset(turn.result_tokens), self.result_copy_bias, after=REPLY_HEAD))
        return GenerationSettings(
            controls=tuple(controls),
            max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=stops,
        )

    def _events(self, messages: list[BaseMessage], stop, kwargs) -> Iterator[ChatGenerationChunk]:
        """The turn as chunks: text pieces as they decode (buffered under a tool grammar), then a final chunk
        with usage, finish reason and any tool call."""
        turn, _ = self._begin_turn(messages, kwargs)
        settings = self._settings(stop, kwargs, turn)
        done: GenerationDone | None = None
        raw, shown = "", ""  # under a grammar: the envelope so far, and the reply text already streamed
        for event in self.engine.stream(turn.state, turn.prompt_ids, settings, turn.grammar):
            if isinstance(event, GenerationDone):
                done = event
            elif turn.grammar is None:
                yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))
            else:
                raw += event.text
                partial = partial_reply_text(raw)
                if partial is not None and partial.startswith(shown) and len(partial) > len(shown):
                    yield ChatGenerationChunk(message=AIMessageChunk(content=partial[len(shown) :]))
                    shown = partial
        content, tool_chunks = "", []
        if turn.grammar is not None:
            parsed = parse_envelope(done.text, turn.specs)
            content = parsed.text[len(shown) :] if parsed.text.startswith(shown) else parsed.text
            tool_chunks = [
                tool_call_chunk(name=c["name"], args=_json(c["args"]), id=c["id"], index=i)
                for i, c in enumerate(parsed.tool_calls)
            ]
        usage = {
            "input_tokens": done.prompt_tokens,
            "output_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }
        metadata = {
            "finish_reason": "tool_calls" if tool_chunks else done.finish_reason,
            "model_name": self.model_name,
            "memory_tokens_written": turn.tokens_written,
            "retrieved_notes": len(turn.notes),
        }
        if turn.choice is not None:
            metadata["tool_choice"] = {"action": turn.choice.action, "method": turn.choice.method}
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content=content,
                tool_call_chunks=tool_chunks,
                usage_metadata=usage,
                response_metadata=metadata,
                chunk_position="last",
            )
        )

    # ---- LangChain entry points -----------------------------------------------------------------------------

    def _call_kwargs(self, config, kwargs: dict) -> dict:
        """The thread id (standalone use) and the live values of grounded arguments, resolved once per call
        from the run config (plain lists, so nothing but data travels with the call)."""
        kwargs = _with_thread(config, kwargs)
        bound = {(t.get("function") or t).get("name") for t in kwargs.get("tools") or []}
        if self.value_providers and bound:
            run_config = ensure_config(config)
            kwargs[VALUES_KWARG] = {
                tool: {arg: list(provider(run_config)) for arg, provider in args.items()}
                for tool, args in self.value_providers.items()
                if tool in bound
            }
        return kwargs

    def invoke(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002 - LangChain's signature
        return super().invoke(input, config, stop=stop, **self._call_kwargs(config, kwargs))

    async def ainvoke(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        return await super().ainvoke(input, config, stop=stop, **self._call_kwargs(config, kwargs))

    def stream(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        yield from super().stream(input, config, stop=stop, **self._call_kwargs(config, kwargs))

    async def astream(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        async for chunk in super().astream(input, config, stop=stop, **self._call_kwargs(config, kwargs)):
            yield chunk

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._events(messages, stop, kwargs):
            if run_manager is not None and chunk.message.content:
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        events = self._events(messages, stop, kwargs)
        end = object()
        while True:
            chunk = await asyncio.to_thread(next, events, end)  # model work off the event loop
            if chunk is end:
                break
            if run_manager is not None and chunk.message.content:
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result(list(self._stream(messages, stop, run_manager, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result([chunk async for chunk in self._astream(messages, stop, run_manager, **kwargs)])


def _without(prompt: list[dict], extra: str) -> list[dict]:
    """The prompt without the tool instructions at the end of its system message (what likelihood tool choice
    scores on: the conversation, not the list of every tool)."""
    if not extra or not prompt or prompt[0]["role"] != "system":
        return prompt
    system = prompt[0]["content"].removesuffix(extra).rstrip()
    return ([{"role": "system", "content": system}] if system else []) + prompt[1:]


def _copy_tokens(tokenizer, text: str) -> tuple[int, ...]:
    """The tokens of ``text`` as it stands and of each of its words alone: inside a JSON string a value starts
    right after the quote, without the space that precedes the word in the text (" progress" vs "progress")."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for word in text.split():
        ids += tokenizer(word.strip(".,!?;:"), add_special_tokens=False)["input_ids"]
    return tuple(dict.fromkeys(ids))


def _with_system_text(prompt: list[dict], text: str) -> list[dict]:
    """The prompt with ``text`` after its system message (a new system message if it has none)."""
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + text}, *prompt[1:]]
    return [{"role": "system", "content": text}, *prompt]


def _newest_user_text(messages: list[BaseMessage]) -> str:
    from langchain_core.messages import HumanMessage

    users = [m for m in messages if isinstance(m, HumanMessage)]
    return users[-1].text if users else ""


def _with_thread(config, kwargs: dict) -> dict:
    """Pass the run's ``thread_id`` (standalone use) down to the turn as a keyword."""
    thread_id = ensure_config(config).get("configurable", {}).get("thread_id")
    if thread_id is not None and TURN_KWARG not in kwargs:
        kwargs = {**kwargs, THREAD_KWARG: str(thread_id)}
    return kwargs


def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    message: AIMessageChunk = merged.message
    ai = AIMessage(
        content=message.content,
        tool_calls=message.tool_calls,
        invalid_tool_calls=message.invalid_tool_calls,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        id=message.id,
    )
    return ChatResult(generations=[ChatGeneration(message=ai)])


def _json(value) -> str:
    import json

    return json.dumps(value)
