"""MemoryCarrier: the live memory of one generation, carried by its KV cache from one forward call to the next.

State never lives on the model's modules: each cache (each generation, each conversation) has its own carrier,
so concurrent generations on one backbone cannot see each other's memory.
"""

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

CARRIER_ATTRIBUTE = "_deltamem_carrier"


@dataclass
class MemoryCarrier:
    """Mutable per-generation memory.

    Attributes:
        states: one ``(B, H, r, r)`` float32 tensor per memory layer, or None for the empty state.
        writes: whether forward calls write the memory (reads always happen).
        segment_ids: ``(B, T)`` message ids for the NEXT forward call only (segment strategy), then cleared.
    """

    states: list[torch.Tensor | None]
    writes: bool = True
    segment_ids: torch.Tensor | None = None


@dataclass
class CallContext:
    """What the hooks of one forward call share: the carrier, the current tokens' padding mask and the
    corrections each attention layer's pre-hook computed (``MemoryLayer.forward``) for its projection hooks."""

    carrier: MemoryCarrier
    mask: torch.Tensor | None  # (B, T) true for real tokens, or None when nothing is padded
    segment_ids: torch.Tensor | None  # (B, T) or None
    deltas: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # position -> {name: (B, T, out)}
    plan: object | None = None  # a core.decode_plan.DecodePlan when the fused one-token decode applies


# One value per thread and per asyncio task: concurrent forward calls each see their own context.
CURRENT_CALL: ContextVar[CallContext | None] = ContextVar("deltamem_current_call", default=None)


def carrier_of(cache, num_layers: int) -> MemoryCarrier:
    """The carrier riding on ``cache``, attaching an empty one (zero state, writes on) if it has none."""
    carrier = getattr(cache, CARRIER_ATTRIBUTE, None)
    if carrier is None:
        carrier = MemoryCarrier(states=[None] * num_layers)
        setattr(cache, CARRIER_ATTRIBUTE, carrier)
    return carrier
