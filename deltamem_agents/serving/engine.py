"""MemoryEngine: one backbone with memory, serving many threads — the write pass and token-by-token decoding.

Every call gets its own memory state and KV cache; the engine holds no per-thread state. Forward calls are
serialised by one lock (per forward step, so concurrent streams interleave fairly); a thread's numbers are the
same whether it runs alone or beside others.
"""

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltamem_agents.core.attach import attach_memory, attachment_of, has_memory
from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.core.state import MemoryState
from deltamem_agents.serving.templating import render_chat

PLACEHOLDER_SYSTEM = {"role": "system", "content": "-"}  # keeps templates from injecting a default system prompt
DEFAULT_WRITE_PIECE_TOKENS = 1024


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; temperature 0 (or None) means greedy."""

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    controls: tuple = ()  # logit controls (serving.repetition): none by default, so evaluations stay pinned


@dataclass(frozen=True)
class TextPiece:
    """Newly decoded text."""

    text: str


@dataclass(frozen=True)
class GenerationDone:
    """End of a generation: the whole text and the token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class MemoryEngine:
    """A causal LM with δ-mem attached, plus its tokenizer.

    Args:
        model: a transformers causal LM; memory is attached with ``config`` if it has none.
        tokenizer: its tokenizer (with a chat template).
        config: adapter config used when attaching; default: TSW with zero-init corrections, so an untrained
            memory never changes the backbone's answers.
        max_context: token limit of one forward context (default: the model's max positions).
    """

    def __init__(self, model, tokenizer, config: DeltaMemConfig | None = None, max_context: int | None = None):
        if not has_memory(model):
            attach_memory(model, config or DeltaMemConfig(correction_init="zero"))
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        self.max_context = max_context or positions
        self.write_piece_tokens = min(DEFAULT_WRITE_PIECE_TOKENS, self.max_context)
        self.eos_ids = _eos_ids(model, tokenizer)
        # Templates that know no "tool" role (the embedded SmolLM2's) see tool results as user messages.
        self.template_has_tool_role = "tool" in (getattr(tokenizer, "chat_template", None) or "")

    def template_messages(self, messages: list[dict]) -> list[dict]:
        """Chat dicts as this tokenizer's template can render them."""
        if self.template_has_tool_role:
            return messages
        return [
            {"role": "user", "content": f"Tool result: {m['content']}"} if m["role"] == "tool" else m for m in messages
        ]

    @property
    def config(self) -> DeltaMemConfig:
        return attachment_of(self.model).config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        return attachment_of(self.model).fingerprint(self.model)

    def empty_state(self) -> MemoryState:
        attachment = attachment_of(self.model)
        cfg = attachment.config
        return MemoryState.zeros(attachment.layers, cfg.num_heads, cfg.rank, self.fingerprint())

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_prompt(self, messages: list[dict]) -> torch.Tensor:
        """``(T,)`` prompt ids: the messages with the chat template and the generation prompt."""
        return render_chat(self.tokenizer, self.template_messages(messages), add_generation_prompt=True).input_ids

    def write(self, state: MemoryState | None, messages: list[dict]) -> tuple[MemoryState, int]:
        """Write ``messages`` (chat dicts, in order) into ``state``; returns the new state and tokens written.

        The messages are rendered with the chat template (the template's own preamble is not written) and fed in
        pieces of at most ``write_piece_tokens``; a new KV context is started whenever the context limit would be
        exceeded, the memory carrying over. For the segment strategy each message is one write.
        """
        state = state or self.empty_state()
        if not messages:
            return state, 0
        rendered = render_chat(self.tokenizer, [PLACEHOLDER_SYSTEM, *self.template_messages(messages)])
        keep = rendered.message_index >= 1
        ids = rendered.input_ids[keep]  # (T,)
        segments = rendered.message_index[keep] - 1  # (T,) message index within ``messages``
        pieces = self._pieces(segments)
        with self.lock, torch.no_grad():
            cache = DeltaMemCache(self.model, state)
            for start, stop in pieces:
                if cache.get_seq_length() + (stop - start) > self.max_context:
                    cache = DeltaMemCache(self.model, cache.memory_state())
                if self.config.write == "segment":
                    cache.set_segment_ids(segments[None, start:stop].to(self.device))
                self.model(ids[None, start:stop].to(self.device), cache=cache)
            return cache.memory_state(), int(ids.shape[0])

    def _pieces(self, segments: torch.Tensor) -> list[tuple[int, int]]:
        """Token ranges of at most ``write_piece_tokens``; for the segment strategy, cut only between messages
        (a single message longer than a piece is cut, and then counts as several writes)."""
        total, size = segments.shape[0], self.write_piece_tokens
        if self.config.write != "segment":
            return [(s, min(s + size, total)) for s in range(0, total, size)]
        bounds = [0] + [i for i in range(1, total) if segments[i] != segments[i - 1]] + [total]
        pieces, start = [], 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - start > size and a > start:
                pieces.append((start, a))
                start = a
            while b - start > size:
                pieces.append((start, start + size))
                start += size
        if start < total:
            pieces.append((start, total))
        return pieces

    def stream(
        self,
        state: MemoryState | None,
        prompt_ids: torch.Tensor,
        settings: GenerationSettings,
        grammar=None,
    ) -> Iterator[TextPiece | GenerationDone]:
        """Decode a reply to ``prompt_ids`` reading ``state`` with writes off; yields TextPiece, then one
        GenerationDone. ``grammar`` is a compiled xgrammar grammar constraining every token, or None."""
        state = state or self.empty_state()
        prompt_ids = prompt_ids[-(self.max_context - settings.max_new_tokens) :]  # (T,) never past the context
        generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        matcher, bitmask = _matcher(grammar, self.model)
        controls = [control.start() for control in settings.controls]
        cache = DeltaMemCache(self.model, state, writes=False)
        produced: list[int] = []
        emitted, finish = "", "length"
        holdback = max((len(s) for s in settings.stop), default=1) - 1
        step_input = prompt_ids[None].to(self.device)  # (1, T)
        for _ in range(settings.max_new_tokens):
            with self.lock, torch.no_grad():
                logits = self.model(step_input, cache=cache).logits[0, -1].float()  # (V,)
            if matcher is not None:
                _apply_grammar(matcher, bitmask, logits)
            for control in controls:
                control.adjust(logits)
            token = _sample(logits, settings, generator)
            if matcher is not None:
                matcher.accept_token(token)
            if token in self.eos_ids:
                finish = "stop"
                break
            produced.append(token)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            hit = _first_stop(text, settings.stop)
            if hit is not None:
                text, finish = text[:hit], "stop"
            ready = text if hit is not None else text[: max(len(text) - holdback, len(emitted))]
            if ready.endswith("\ufffd") and hit is None:
                ready = ready[:-1]  # an incomplete multi-byte character: wait for the next token
            if len(ready) > len(emitted):
                yield TextPiece(ready[len(emitted) :])
                emitted = ready
            if hit is not None or (matcher is not None and matcher.is_terminated()):
                finish = "stop"
                break
            if [control.observe(token, produced, text) for control in controls].count(True):
                finish = "stop"  # a control ended the reply (it started to cycle)
                break
            step_input = torch.tensor([[token]], device=self.device)  # (1, 1)
        final = self.tokenizer.decode(produced, skip_special_tokens=True)
        hit = _first_stop(final, settings.stop)
        final = final if hit is None else final[:hit]
        if len(final) > len(emitted) and final.startswith(emitted):
            yield TextPiece(final[len(emitted) :])
        yield GenerationDone(final, int(prompt_ids.shape[0]), len(produced), finish)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _sample(logits: torch.Tensor, settings: GenerationSettings, generator) -> int:
    """Greedy for temperature 0/None, else temperature + nucleus sampling with the seeded generator."""
    if not settings.temperature:
        return int(logits.argmax())
    probs = torch.softmax(logits / settings.temperature, dim=-1)  # (V,)
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _matcher(grammar, model):
    if grammar is None:
        return None, None
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammar)
    return matcher, xgr.allocate_token_bitmask(1, model.config.vocab_size)


def _apply_grammar(matcher, bitmask, logits: torch.Tensor) -> None:
    import xgrammar as xgr

    matcher.fill_next_token_bitmask(bitmask)
    xgr.apply_token_bitmask_inplace(logits[None], bitmask)
