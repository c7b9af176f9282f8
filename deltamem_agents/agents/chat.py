"""DeltaMemChat: a LangChain chat model over a local backbone with δ-mem, whose memory follows the messages it is given.

Each call is one turn of the protocol in ``deltamem_agents.agents.turn``: the messages older than the newest user
message (system messages aside) are the ones the memory must hold, and the reply is decoded from a bounded prompt
(system + notes + window) reading that memory with writes off. The memory is a function of those messages, so
it is looked up in the chat model's content-addressed ``store`` (``deltamem_agents.agents.store``) by a hash chain
over them: the longest stored prefix is read, only the rest is written, and the new state is stored. Whatever
holds the messages (any LangGraph checkpointer, a fork, an old checkpoint, a chat history, another process)
gets exactly their memory; nothing about the memory travels in the call's keywords, the graph state, run
metadata or cache keys. The run's ``thread_id`` (or ``session_id``) only records which thread used which states,
for :meth:`DeltaMemChat.forget`.
"""

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar, copy_context
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr

from deltamem_agents.agents.call_options import resolve_call_options
from deltamem_agents.agents.store import InMemoryStore
from deltamem_agents.agents.turn import WindowPolicy, plan_turn
from deltamem_agents.core.adapter import SHIPPED_ADAPTERS
from deltamem_agents.core.errors import ConfigError, DeltaMemError
from deltamem_agents.core.state import MemoryState
from deltamem_agents.models import default_backbone
from deltamem_agents.serving.choice_head import WEIGHTS_FILE as CHOICE_HEAD_FILE
from deltamem_agents.serving.choice_head import ChoiceHead
from deltamem_agents.serving.engine import GenerationDone, GenerationSettings, MemoryEngine
from deltamem_agents.serving.repetition import CopyBias, RepetitionSettings
from deltamem_agents.serving.sentence_limit import CloseAtSentenceEnd, SentenceLimit
from deltamem_agents.serving.span_choice import SpanChoice, best_span, span_scores
from deltamem_agents.serving.span_copy import SpanCopy
from deltamem_agents.serving.thread_locks import ThreadLocks
from deltamem_agents.serving.tool_choice import choose_action
from deltamem_agents.serving.tool_grammar import (
    ACTION_HEAD,
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
THREAD_LOCKS = ThreadLocks()  # keyed by (store, thread): a thread's turn and its forget do not interleave
VALUES_KWARG = "deltamem_live_values"  # {tool: {argument: values}} from value_providers, resolved per call
EMBEDDED_BACKBONE = "smollm2-135m-instruct"
EMBEDDED_CHOICE_HEAD = "smollm2-135m-choice-head"  # under deltamem_agents/adapters (scripts/train_choice_head.py)


class StructuredOutputError(DeltaMemError, ValueError):
    """``with_structured_output`` got no complete object (e.g. the reply hit the token limit)."""


_UNSET = object()
# The thread (owner) of the model call running in this context, resolved from the run config by our entry
# points; a context variable, so it stays out of the call's keywords, invocation params and cache keys.
CALL_THREAD: ContextVar[Any] = ContextVar("deltamem_call_thread", default=_UNSET)


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
      - ``note_roles``: the roles whose older messages BM25 recall may put in the prompt as notes (``recall=
        "latent+retrieval"``); by default the user's only (not the assistant's own replies, which a small model
        copies, nor old tool results, which go stale). ``window_starts_on_user``: the window's first message is a
        user message (an older reply or call whose request fell out of the window is left out with it).
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
      - ``span_scoring``: how the span of a span argument is picked: ``"greedy"`` (token by token, the default)
        or ``"likelihood"`` (``serving.span_choice``: every word-aligned span of the request up to 12 words is
        scored as a whole, ``(log p(span) + log p(close)) / (tokens + 1) ** span_length_power``, and the best is
        written).
      - ``reply_envelope``: with tools bound, a reply that is the only action left (``tool_choice="none"``, or the
        likelihood choice picked the reply) is decoded as plain text, as earlier replies appear in the prompt
        (False, the default), or inside the JSON envelope (True). Inside the envelope the 135M model wrote "This
        is a JSON object that contains ..." to a thank-you. Where the prompt shows an earlier tool call (the
        answer after a tool round) the envelope is used either way: as plain text the model copied the call.
      - ``choice_head``: a folder with a tool-choice head (``serving.choice_head``: a linear read-out of the
        hidden states of the likelihood choice's own forwards, trained on generated requests over tool sets of
        other domains); each action's score is then ``channel_weight * channel + head``. Replies, arguments and
        the memory are the backbone's own. The embedded backbone's shipped head is the default of
        :meth:`from_backbone` (``choice_head=None`` turns it off).
      - ``choice_window``: whether the likelihood choice scores the newest user message after the whole window
        (True) or after the system message alone (False, the default; the memory is read either way). With
        the window, earlier turns moved the scores of a small model more than the request did (a "please close
        my ticket" after two older turns scored as a reply; docs/tool-choice.md), and the choice head was
        trained on single turns.
      - ``result_copy_bias``: after a tool result, added to the logits of the result's tokens while the reply
        text is decoded, so the reply restates what the tool said (the model still writes it).
      - ``reply_sentences``: a reply stops after this many sentences (``serving.sentence_limit``; tool arguments
        are never cut); None: no limit but ``max_new_tokens``.
      - ``reply_sentence_words``: a reply sentence that already has this many words ends at its next clause
        break (the comma or semicolon the model would write becomes a full stop, ``SentenceLimit.sentence_words``),
        so comma-joined run-ons count as sentences; None: sentences of any length.
      - ``reply_closes_at_sentence_end``: inside a reply envelope the reply may only end after a finished sentence
        (``serving.sentence_limit.CloseAtSentenceEnd``): a quote copied from a tool result ("Event 3 \"budget
        review\" ...") no longer ends the reply mid-sentence.
    """

    # Unknown constructor arguments are an error (pydantic's own message names them), not silently ignored;
    # ``max_tokens`` and ``model`` are accepted as the LangChain spellings of ``max_new_tokens`` / ``model_name``.
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)
    _loaded_head: Any = PrivateAttr(default=None)  # ((path, id(model)), ChoiceHead) of choice_head

    engine: Any = Field(exclude=True)
    window_messages: int = 4
    window_tokens: int = 768
    recall: Literal["latent", "latent+retrieval"] = "latent+retrieval"
    notes_tokens: int = 192
    note_roles: tuple[str, ...] = ("user",)
    window_starts_on_user: bool = True
    max_new_tokens: int = Field(160, alias="max_tokens", gt=0)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    store: Any = Field(default_factory=InMemoryStore, exclude=True)
    thread_keys: tuple[str, ...] = ("thread_id", "session_id")
    model_name: str = Field("deltamem", alias="model")
    tool_preselect: int | None = None
    tool_scoring: Literal["grammar", "likelihood"] = "grammar"
    reply_bias: float = 0.0
    value_providers: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True)
    repetition: RepetitionSettings | None = Field(default_factory=RepetitionSettings)
    copy_bias: float = 0.0
    span_arguments: dict[str, list[str]] | Literal["strings"] = Field(default_factory=dict)
    span_scoring: Literal["greedy", "likelihood"] = "greedy"
    span_length_power: float = Field(0.75, ge=0.0)
    result_copy_bias: float = 0.0
    reply_sentences: int | None = Field(None, gt=0)
    reply_sentence_words: int | None = Field(None, gt=0)
    reply_closes_at_sentence_end: bool = False
    reply_envelope: bool = False
    choice_head: str | None = None
    choice_window: bool = False
    streaming: bool = False  # LangChain's convention; tokens reach callbacks' on_llm_new_token either way

    @classmethod
    def from_backbone(
        cls, backbone: str | None = None, adapter: str | None = "default", device=None, **kwargs
    ) -> "DeltaMemChat":
        """Load ``backbone`` (see ``load_backbone``; None: ``$DELTAMEM_BACKBONE`` or the embedded SmolLM2-135M)
        and an adapter: a saved folder, ``"default"`` (the shipped adapter that passes rungs 1 and 4 of
        docs/evaluation.md; while none does, the zero-init identity) or None (the engine's zero-init identity)."""
        from deltamem_agents.models.backbone_zoo import load_backbone
        from deltamem_agents.models.default_adapter import apply_adapter

        backbone = backbone or default_backbone()
        model, tokenizer = load_backbone(backbone, device=device)
        apply_adapter(model, adapter, backbone, log=log.info)
        if backbone == EMBEDDED_BACKBONE:
            kwargs.setdefault("tool_scoring", "likelihood")
            kwargs.setdefault("copy_bias", 2.0)
            # replies after a tool result, tune half of examples/ticketing_bot/result_replies.json: 8/12 with bias 2
            # and no limit, 10/12 with bias 3, two sentences and no close mid-sentence (docs/tool-choice.md)
            kwargs.setdefault("result_copy_bias", 3.0)
            kwargs.setdefault("reply_sentences", 2)
            # a sentence of 25 words ends at its next comma (set a priori: the tune half has no comma run-on, and
            # every value from 12 to 30 words leaves it at 10/12; the story's comment reply ran on for 150 tokens)
            kwargs.setdefault("reply_sentence_words", 25)
            kwargs.setdefault("reply_closes_at_sentence_end", True)
            kwargs.setdefault("span_arguments", "strings")  # tune half: 22/31 -> 27/31 stated values exact
            kwargs.setdefault("span_scoring", "likelihood")  # tune half: 46/51 -> 47/51 stated (powers 0.25-0.75)
            shipped = SHIPPED_ADAPTERS / EMBEDDED_CHOICE_HEAD
            if (shipped / CHOICE_HEAD_FILE).is_file() and kwargs["tool_scoring"] == "likelihood":
                kwargs.setdefault("choice_head", str(shipped))
            # tuned on the tune half of the request set (docs/tool-choice.md): 1.5 for the channel score alone,
            # 0.75 (the middle of the tune half's plateau, 0 to 1.5) with the choice head
            kwargs.setdefault("reply_bias", 0.75 if kwargs.get("choice_head") else 1.5)
        return cls(engine=MemoryEngine(model, tokenizer), model_name=backbone, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "deltamem-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """What determines a reply besides the messages and call keywords: every setting, and the fingerprint of
        the backbone and adapter weights. These are the invocation params and the LLM-cache key; nothing about
        a thread is (its memory is a function of the messages, which the cache key holds)."""
        own = set(type(self).model_fields) - set(BaseChatModel.model_fields) - {"thread_keys"}
        params = self.model_dump(mode="json", include=own)  # engine, store, value_providers are excluded fields
        params["memory_fingerprint"] = self.engine.fingerprint()
        params["choice_head_fingerprint"] = self.choice_head_fingerprint()
        return params

    def __init__(self, **data):
        super().__init__(**data)
        self._check_choice_head()

    def _check_choice_head(self) -> None:
        """A choice head is read (and checked against the backbone) when the chat is built, so a bad path fails
        there with its reason (ConfigError / AdapterError), not at every later call; it needs the likelihood
        choice."""
        if self.choice_head is not None:
            if self.tool_scoring != "likelihood":
                raise ConfigError(
                    f"choice_head={self.choice_head!r} needs tool_scoring='likelihood' (it re-scores the likelihood "
                    "choice); set tool_scoring='likelihood' or choice_head=None"
                )
            self._choice_head()

    def _choice_head(self):
        """The loaded tool-choice head (read once per chat, path and model), or None."""
        if self.choice_head is None:
            return None
        key = (self.choice_head, id(self.engine.model))
        cached = self._loaded_head
        if cached is None or cached[0] != key:
            config = self.engine.model.config
            head = ChoiceHead.load(self.choice_head, config.hidden_size, config.num_hidden_layers + 1)
            cached = self._loaded_head = (key, head)
        return cached[1]

    def choice_head_fingerprint(self) -> str | None:
        """The fingerprint of the tool-choice head's weights, or None without one."""
        head = self._choice_head()
        return head.fingerprint() if head is not None else None

    def _get_ls_params(self, stop=None, **kwargs):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "deltamem"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        params["ls_max_tokens"] = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens))
        return params

    @property
    def window(self) -> WindowPolicy:
        return WindowPolicy(
            self.window_messages,
            self.window_tokens,
            self.recall,
            self.notes_tokens,
            note_roles=self.note_roles,
            start_on_user=self.window_starts_on_user,
        )

    def forget(self, thread_id: str) -> int:
        """Forget a thread: drop its references in :attr:`store` and every memory state that no other thread
        used; returns how many states were removed. With a LangGraph checkpointer, call
        ``deltamem_agents.forget_thread(checkpointer, chat, thread_id)``, which also deletes the checkpoints (the
        messages); a later turn on messages that are still held elsewhere recomputes their memory."""
        with self._hold_thread(thread_id):  # not in the middle of a turn of the thread
            return self.store.forget(str(thread_id))

    def _hold_thread(self, thread_id):
        """Hold the lock of one thread of this chat model's store."""
        return THREAD_LOCKS.hold((id(self.store), str(thread_id)))

    def thread_of(self, config=None) -> str | None:
        """The thread a run belongs to: the first of :attr:`thread_keys` in its ``configurable`` (the config
        given, merged with the one LangGraph sets for the running node), as a string; None without one."""
        configurable = ensure_config(config).get("configurable") or {}
        for key in self.thread_keys:
            if configurable.get(key) is not None:
                return str(configurable[key])
        return None

    def memory_of(self, messages: list[BaseMessage]) -> MemoryState:
        """The memory a turn on ``messages`` reads (the state of the messages before the newest user message),
        from :attr:`store` or, where it holds no state for them, computed from the longest stored prefix (not
        stored). For inspection and tests: a graph state's ``messages`` give the memory of that checkpoint."""
        plan = plan_turn(messages, (), self.window, self.engine.count_tokens)
        state, _ = self._memory(plan.to_write, store=False)
        return state or self.engine.empty_state()

    def stored_memory(self, messages: list[BaseMessage]) -> bytes | None:
        """The stored state bytes of exactly the memory :meth:`memory_of` gives, or None if the store holds
        none for those messages (empty memory: the bytes of the empty state)."""
        to_write = plan_turn(messages, (), self.window, self.engine.count_tokens).to_write
        keys = self.engine.state_keys(to_write)
        return self.store.get(keys[-1]) if keys else self.engine.empty_state().to_bytes()

    def _memory(self, to_write: list[dict], store: bool = True, thread: str | None = None):
        """The state after ``to_write``: the longest stored prefix, the rest written; stored under its key for
        ``thread`` (a call without a thread reads the store but adds nothing to it). Returns the state (None for
        the empty memory) and the tokens written."""
        keys = self.engine.state_keys(to_write)
        found, data = self.store.longest(keys)
        fingerprint = self.engine.fingerprint()
        state = MemoryState.from_bytes(data, fingerprint, self.engine.memory_layers) if data else None
        state, tokens_written = self.engine.write(state, to_write[found:]) if found < len(keys) else (state, 0)
        if store and thread is not None and keys:
            self.store.put(keys[-1], state.to_bytes() if found < len(keys) else None, thread)
        return state, tokens_written

    def get_num_tokens(self, text: str) -> int:
        """Token count from the backbone's real tokenizer."""
        return self.engine.count_tokens(text)

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any):
        """Bind tools (functions, pydantic models, BaseTools or OpenAI tool dicts); ``tool_choice`` is "auto"
        (default: reply or call), "any"/"required" (must call), "none", or a tool name."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        allowed_actions(tool_specs(formatted), tool_choice)  # validate names and tool_choice now
        resolve_call_options(kwargs, self.model_name)  # and the other arguments
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self, schema, *, include_raw: bool = False, on_cutoff: Literal["raise", "none"] = "raise", **kwargs: Any
    ):
        """Structured output through a forced tool call decoded under the schema's grammar (LangChain's
        ``function_calling`` method: pydantic classes, TypedDicts or JSON schemas). When the reply is cut off
        (``max_tokens``) before the object is complete, ``on_cutoff="raise"`` (the default) raises
        :class:`StructuredOutputError` saying so (with ``include_raw=True`` it is returned as ``parsing_error``
        beside the raw message, LangChain's convention); ``"none"`` returns None as LangChain's default does."""
        if on_cutoff not in ("raise", "none"):
            raise ConfigError(f"on_cutoff must be 'raise' or 'none', got {on_cutoff!r}")
        kwargs.pop("method", None)
        kwargs.pop("strict", None)
        if kwargs:
            raise ConfigError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        if on_cutoff == "none":
            return super().with_structured_output(schema, include_raw=include_raw)
        llm = self.bind_tools(
            [schema],
            tool_choice="any",
            ls_structured_output_format={"kwargs": {"method": "function_calling"}, "schema": schema},
        )
        parser = RunnableLambda(_require_tool_call, name="require_complete_object") | _tool_parser(schema)
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # ---- one turn -------------------------------------------------------------------------------------------

    def _begin_turn(self, messages: list[BaseMessage], kwargs: dict) -> _Turn:
        """Find or compute the memory of the older messages, store it, and build the read prompt and grammar."""
        thread = CALL_THREAD.get()
        thread = self.thread_of() if thread is _UNSET else thread  # called past our entry points: the run config
        specs, allow_reply, extra = self._tools(kwargs, _newest_user_text(messages))
        plan = plan_turn(messages, (), self.window, self.engine.count_tokens, extra_system=extra)
        lock = self._hold_thread(thread) if thread is not None else nullcontext()
        with lock:  # a forget of the thread waits for its turn to be stored, and then removes it
            state, tokens_written = self._memory(plan.to_write, thread=thread)
        prompt_ids = self.engine.render_prompt(plan.prompt)
        grammar, choice = None, None
        if kwargs.get("tools"):
            decode_specs, decode_reply = specs, allow_reply
            if self.tool_scoring == "likelihood" and len(specs) + allow_reply > 1:
                choice = choose_action(
                    self.engine,
                    state,
                    _choice_view(_without(plan.prompt, extra), self.choice_window),
                    specs,
                    allow_reply,
                    prompt_ids,
                    self.reply_bias,
                    head=self._choice_head(),
                )
                decode_specs = [s for s in specs if s.name == choice.action]
                decode_reply = not decode_specs
                # the envelope is decoded with the chosen action's instructions only (nothing else is allowed)
                narrowed = _with_system_text(_without(plan.prompt, extra), instructions(decode_specs, decode_reply))
                prompt_ids = self.engine.render_prompt(narrowed)
            if decode_specs or self.reply_envelope or _shows_a_call(plan.prompt):  # else a reply alone is plain text
                schema = envelope_schema(decode_specs, decode_reply)
                grammar = compile_envelope(self.engine.tokenizer, self.engine.model.config.vocab_size, schema)
        else:
            decode_specs = []
        request = _newest_user_text(messages)
        tokenizer = self.engine.tokenizer
        copy_tokens = _copy_tokens(tokenizer, request) if grammar else ()
        spans = frozenset(self._span_arguments(decode_specs)) if grammar else frozenset()
        result = messages[-1].text if kwargs.get("tools") and isinstance(messages[-1], ToolMessage) else ""
        result_tokens = tuple(tokenizer(result, add_special_tokens=False)["input_ids"]) if result else ()
        turn = _Turn(state, prompt_ids, grammar, specs, tokens_written, plan.notes, choice, copy_tokens)
        return dataclasses.replace(turn, request=request, span_arguments=spans, result_tokens=result_tokens)

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
            controls.append(self._span_control(turn))
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
        reply_head = REPLY_HEAD if under_grammar else ""  # where the reply text begins
        if turn is not None and self.result_copy_bias and turn.result_tokens:  # the reply text (plain or enveloped)
            controls.append(CopyBias(frozenset(turn.result_tokens), self.result_copy_bias, after=reply_head))
        if self.reply_sentences is not None or self.reply_sentence_words is not None:
            controls.append(
                SentenceLimit(
                    self.reply_sentences,
                    after=reply_head,
                    sentence_words=self.reply_sentence_words,
                    tokenizer=self.engine.tokenizer,
                )
            )
        if under_grammar and self.reply_closes_at_sentence_end:
            controls.append(CloseAtSentenceEnd(self.engine.tokenizer, after=REPLY_HEAD))
        return GenerationSettings(
            controls=tuple(controls),
            max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            seed=kwargs.get("seed", self.seed),
            stop=stops,
        )

    def _span_control(self, turn: "_Turn"):
        """The control that keeps span arguments spans of the request: greedy (SpanCopy) or chosen by likelihood."""
        tokenizer = self.engine.tokenizer
        if self.span_scoring == "greedy":
            return SpanCopy(turn.request, turn.span_arguments, tokenizer)

        def choose(produced: list[int]) -> tuple[int, ...]:
            prefix = torch.cat([turn.prompt_ids, torch.tensor(produced, dtype=turn.prompt_ids.dtype)])  # (T + n,)
            best = best_span(span_scores(self.engine, turn.state, prefix, turn.request), self.span_length_power)
            return best.token_ids if best is not None else ()

        return SpanChoice(turn.span_arguments, tokenizer, choose)

    def _events(self, messages: list[BaseMessage], stop, kwargs) -> Iterator[ChatGenerationChunk]:
        """The turn as chunks: text pieces as they decode (buffered under a tool grammar), then a final chunk
        with usage, finish reason and any tool call."""
        kwargs = resolve_call_options(kwargs, self.model_name, (VALUES_KWARG,))
        turn = self._begin_turn(messages, kwargs)
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
        """The live values of grounded arguments, resolved once per call from the run config (plain lists, so
        nothing but data travels with the call)."""
        bound = {(t.get("function") or t).get("name") for t in kwargs.get("tools") or []}
        if self.value_providers and bound:
            run_config = ensure_config(config)
            kwargs = {**kwargs}
            kwargs[VALUES_KWARG] = {
                tool: {arg: list(provider(run_config)) for arg, provider in args.items()}
                for tool, args in self.value_providers.items()
                if tool in bound
            }
        return kwargs

    def invoke(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002 - LangChain's signature
        with _calling_thread(self.thread_of(config)):
            return super().invoke(input, config, stop=stop, **self._call_kwargs(config, kwargs))

    async def ainvoke(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        with _calling_thread(self.thread_of(config)):
            return await super().ainvoke(input, config, stop=stop, **self._call_kwargs(config, kwargs))

    def stream(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        context = _context_with_thread(self.thread_of(config))
        chunks = super().stream(input, config, stop=stop, **self._call_kwargs(config, kwargs))
        end = object()
        while (chunk := context.run(next, chunks, end)) is not end:  # each step of the stream in that context
            yield chunk

    async def astream(self, input, config=None, *, stop=None, **kwargs):  # noqa: A002
        context = _context_with_thread(self.thread_of(config))
        chunks = aiter(super().astream(input, config, stop=stop, **self._call_kwargs(config, kwargs)))
        while True:
            try:
                chunk = await asyncio.create_task(anext(chunks), context=context)
            except StopAsyncIteration:
                break
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


def _choice_view(prompt: list[dict], window: bool) -> list[dict]:
    """What the likelihood choice scores: with ``window`` the whole read prompt, else its system messages and
    the current turn (the newest user message and what follows it); older turns reach the choice through the
    memory, which the scoring reads."""
    if window:
        return prompt
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    newest = users[-1] if users else len(prompt)
    return [m for m in prompt[:newest] if m["role"] == "system"] + prompt[newest:]


def _shows_a_call(prompt: list[dict]) -> bool:
    """Whether the prompt holds an earlier tool call (an envelope in an assistant message). A reply decoded as
    plain text after one copies its form (``{"action": "create_ticket", ...}`` as the reply's text), so there the
    reply is decoded inside the envelope."""
    return any(m["role"] == "assistant" and ACTION_HEAD in m["content"] for m in prompt)


def _copy_tokens(tokenizer, text: str) -> tuple[int, ...]:
    """The tokens of ``text`` as it stands and of each of its words alone: inside a JSON string a value starts
    right after the quote, without the space that precedes the word in the text (" progress" vs "progress")."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for word in text.split():
        ids += tokenizer(word.strip(".,!?;:"), add_special_tokens=False)["input_ids"]
    return tuple(dict.fromkeys(ids))


def _with_system_text(prompt: list[dict], text: str) -> list[dict]:
    """The prompt with ``text`` after its system message (a new system message if it has none; no text: as is)."""
    if not text:
        return prompt
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + text}, *prompt[1:]]
    return [{"role": "system", "content": text}, *prompt]


def _newest_user_text(messages: list[BaseMessage]) -> str:
    from langchain_core.messages import HumanMessage

    users = [m for m in messages if isinstance(m, HumanMessage)]
    return users[-1].text if users else ""


@contextmanager
def _calling_thread(thread: str | None):
    """Set :data:`CALL_THREAD` for the block."""
    token = CALL_THREAD.set(thread)
    try:
        yield
    finally:
        CALL_THREAD.reset(token)


def _context_with_thread(thread: str | None):
    """A copy of the current context with :data:`CALL_THREAD` set (for streams, whose steps run in it)."""
    context = copy_context()
    context.run(CALL_THREAD.set, thread)
    return context


def _require_tool_call(message: AIMessage) -> AIMessage:
    """Structured output: the message must hold the forced call; a reply cut off before it was complete does not."""
    if message.tool_calls:
        return message
    meta = message.response_metadata or {}
    tokens = (message.usage_metadata or {}).get("output_tokens")
    if meta.get("finish_reason") == "length":
        raise StructuredOutputError(
            f"the structured output was cut off after {tokens} tokens, before the object was complete; raise "
            "max_tokens (DeltaMemChat(max_tokens=...) or .bind(max_tokens=...)), or pass on_cutoff='none' to get "
            "None instead"
        )
    raise StructuredOutputError(
        f"the model produced no structured object (finish_reason {meta.get('finish_reason')!r})"
    )


def _tool_parser(schema):
    """LangChain's parser of the first tool call into ``schema`` (a pydantic instance, else a dict)."""
    if isinstance(schema, type) and is_basemodel_subclass(schema):
        return PydanticToolsParser(tools=[schema], first_tool_only=True)
    return JsonOutputKeyToolsParser(key_name=convert_to_openai_tool(schema)["function"]["name"], first_tool_only=True)


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
