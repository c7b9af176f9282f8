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
from deltamem_agents.core.config import IDENTITY_CONFIG, DeltaMemConfig
from deltamem_agents.core.errors import MessageError
from deltamem_agents.core.state import MemoryState
from deltamem_agents.serving import write_schedule
from deltamem_agents.serving.state_keys import MessageDigests, chain, root_key
from deltamem_agents.serving.templating import render_prompt_ids


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; temperature 0 (or None) means greedy. ``ignore_eos`` decodes exactly
    ``max_new_tokens`` tokens (benchmarks compare replies of equal length)."""

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
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
            attach_memory(model, config or IDENTITY_CONFIG)
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
        self.max_context = max_context or positions
        self.write_piece_tokens = min(write_schedule.DEFAULT_PIECE_TOKENS, self.max_context)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._digests = MessageDigests(tokenizer)

    @property
    def config(self) -> DeltaMemConfig:
        return attachment_of(self.model).config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """The backbone layer indices that carry memory (every state this engine reads must cover them)."""
        return attachment_of(self.model).layers

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
        return render_prompt_ids(self.tokenizer, messages)

    def write(self, state: MemoryState | None, messages: list[dict]) -> tuple[MemoryState, int]:
        """Write ``messages`` (chat dicts, in order) into ``state`` under the write schedule (one forward call per
        message, see ``deltamem_agents.serving.write_schedule``); returns the new state and tokens written."""
        with self.lock:
            return write_schedule.write_messages(self.model, self.tokenizer, messages, state, self.write_piece_tokens)

    def state_keys(self, messages: list[dict]) -> list[str]:
        """The content keys of the states after each non-system message of ``messages`` (chat dicts, in order)
        as :meth:`write` writes them: ``keys[i]`` names the state after the first i + 1 of them
        (``serving.state_keys``)."""
        digests = [self._digests(m) for m in messages if m["role"] != "system"]
        return chain(root_key(self.fingerprint(), self.write_piece_tokens), digests)

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
        room = self.max_context - int(prompt_ids.shape[0])  # positions left for the reply
        if room < 1:
            raise MessageError(
                f"the prompt has {prompt_ids.shape[0]} tokens but the context holds {self.max_context}: nothing of it "
                "was cut (that could drop the system message); shorten the window (window_tokens, notes_tokens) "
                "or the system prompt"
            )
        budget = min(settings.max_new_tokens, room)  # the reply stops at the context limit ("length")
        generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        matcher, bitmask = _matcher(grammar, self.model)
        controls = [control.start() for control in settings.controls]
        cache = DeltaMemCache(self.model, state, writes=False)
        produced: list[int] = []
        emitted, finish = "", "length"
        holdback = max((len(s) for s in settings.stop), default=1) - 1
        step_input = prompt_ids[None].to(self.device)  # (1, T)
        for _ in range(budget):
            with self.lock, torch.no_grad():
                logits = self.model(step_input, cache=cache).logits[0, -1].float()  # (V,)
            if matcher is not None:
                _apply_grammar(matcher, bitmask, logits)
            for control in controls:
                control.adjust(logits)
            token = _sample(logits, settings, generator)
            if matcher is not None:
                matcher.accept_token(token)
            if token in self.eos_ids and not settings.ignore_eos:
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
