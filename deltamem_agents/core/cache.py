"""DeltaMemCache: a transformers DynamicCache that also carries the δ-mem state of its generation."""

import torch
from transformers import DynamicCache

from deltamem_agents.core.attach import attachment_of
from deltamem_agents.core.carrier import CARRIER_ATTRIBUTE, MemoryCarrier
from deltamem_agents.core.errors import DeltaMemError
from deltamem_agents.core.state import MemoryState


class DeltaMemCache(DynamicCache):
    """KV cache plus memory state. Pass it as ``cache=`` to ``model(...)`` or ``model.generate(...)``.

    Create it with :func:`deltamem_agents.new_cache`; read the state back with :meth:`memory_state`.
    """

    def __init__(self, model, state: MemoryState | None = None, writes: bool = True):
        super().__init__(config=model.config)
        self._attachment = attachment_of(model)
        self._model = model
        device = self._attachment.device(model)
        states: list[torch.Tensor | None] = [None] * len(self._attachment.layers)
        if state is not None:
            state.check_compatible(self._attachment.fingerprint(model), self._attachment.layers)
            states = list(state.tensor.to(device=device, dtype=torch.float32).unbind(0))  # L x (B, H, r, r)
        setattr(self, CARRIER_ATTRIBUTE, MemoryCarrier(states=states, writes=writes))

    @classmethod
    def from_states(
        cls, model, states: list[torch.Tensor | None], writes: bool = True, segment_ids: torch.Tensor | None = None
    ) -> "DeltaMemCache":
        """A cache over live per-layer state tensors, keeping their autograd graph (no copy, no detach).

        Args:
            model: the model with memory attached.
            states: one ``(B, H, r, r)`` tensor per memory layer, in layer order (None: the empty state), e.g.
                the states a write pass left on another cache, still attached to the memory parameters.
            writes: whether forward calls through this cache write the memory.
            segment_ids: optional message ids for the next call (segment strategy, see :meth:`set_segment_ids`).

        Training uses it to read, with writes off, the states a write pass produced and backpropagate the
        answer loss through them into the write."""
        cache = cls(model, writes=writes)
        cfg = cache._attachment.config
        if len(states) != len(cache._attachment.layers):
            raise DeltaMemError(f"from_states: got {len(states)} states for {len(cache._attachment.layers)} layers")
        for position, state in enumerate(states):
            if state is not None and (
                state.dim() != 4 or tuple(state.shape[1:]) != (cfg.num_heads, cfg.rank, cfg.rank)
            ):
                raise DeltaMemError(
                    f"from_states: state {position} must be (B, {cfg.num_heads}, {cfg.rank}, {cfg.rank}), "
                    f"got {tuple(state.shape)}"
                )
        cache.carrier.states = list(states)
        cache.carrier.segment_ids = segment_ids
        return cache

    @property
    def carrier(self) -> MemoryCarrier:
        return getattr(self, CARRIER_ATTRIBUTE)

    @property
    def memory_writes(self) -> bool:
        """Whether forward calls through this cache write the memory."""
        return self.carrier.writes

    @memory_writes.setter
    def memory_writes(self, value: bool) -> None:
        self.carrier.writes = bool(value)

    def set_segment_ids(self, segment_ids: torch.Tensor | None) -> None:
        """Message id per token ``(B, T)`` for the NEXT forward call (segment strategy; -1 = not written)."""
        self.carrier.segment_ids = segment_ids

    def memory_state(self, batch_size: int | None = None) -> MemoryState:
        """The current memory as an immutable MemoryState (detached, on the CPU)."""
        return memory_state_of(self, self._model, batch_size)


def memory_state_of(cache, model, batch_size: int | None = None) -> MemoryState:
    """The memory riding on any cache used with ``model`` (a DeltaMemCache or one generate() created)."""
    attachment = attachment_of(model)
    carrier = getattr(cache, CARRIER_ATTRIBUTE, None)
    if carrier is None:
        raise DeltaMemError("this cache carries no δ-mem state: was it used with a model with memory attached?")
    known = [s for s in carrier.states if s is not None]
    batch = batch_size or (known[0].shape[0] if known else 1)
    cfg = attachment.config
    parts = [
        (s.detach().float().cpu() if s is not None else torch.zeros(batch, cfg.num_heads, cfg.rank, cfg.rank))
        for s in carrier.states
    ]
    return MemoryState(torch.stack(parts), attachment.fingerprint(model), attachment.layers)
