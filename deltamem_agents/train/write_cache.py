"""Cached write pass for SSW training: each message's per-layer mean attention input, computed once with the
backbone reading the EMPTY memory, then only the r x r recurrence runs per training step.

Why it is a cache and where it is exact: under SSW a message makes ONE write per layer, from the mean of the
layer's attention inputs over the message's tokens (``MemoryLayer.write_segments``). Those inputs come out of
the frozen backbone, and they depend on the memory only through the corrections that earlier layers read from
the state before the call. For the first call of a conversation (the empty state) every read is 0, so the
cached inputs are exactly the ones the write schedule sees; for later calls they are the inputs the backbone
would have produced with no memory, an approximation whose loss and gradient error
``scripts/training_cost.py`` measures against the exact pass (:func:`deltamem_agents.train.objective.write_pass`,
kept as the naive reference). The cache is keyed by the message's token ids, so small talk and
acknowledgements repeated across episodes are computed once.
"""

import time

import torch

from deltamem_agents.core.attach import attachment_of, attention_modules
from deltamem_agents.core.ops import delta_scan_recurrent
from deltamem_agents.serving import write_schedule
from deltamem_agents.train.batching import Example


class MessageInputCache:
    """Per message (token ids) the ``(L, d)`` mean attention input of every memory layer, from the empty state."""

    def __init__(self):
        self.means: dict[tuple[int, ...], torch.Tensor] = {}
        self.seconds = 0.0  # time spent building (for the amortised cost report)
        self.built = 0

    @staticmethod
    def key(piece: torch.Tensor) -> tuple[int, ...]:
        return tuple(piece.tolist())

    @torch.no_grad()
    def fill(self, model, examples: list[Example], pad_id: int = 0, batch_size: int = 16) -> None:
        """Compute the means of every piece of ``examples`` not cached yet (one empty-state call per piece)."""
        tick = time.perf_counter()
        if attachment_of(model).config.write != "segment":
            raise ValueError("the cached write pass needs SSW (write='segment'): TSW/MSW write every token")
        todo, seen = [], set()
        for example in examples:
            for piece in example.write_pieces:
                key = self.key(piece)
                if key not in self.means and key not in seen:
                    seen.add(key)
                    todo.append(piece)
        if not todo:
            return
        todo.sort(key=lambda p: p.shape[0])  # similar lengths together: less padding
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for piece, mean in zip(chunk, empty_state_means(model, chunk, pad_id)):
                self.means[self.key(piece)] = mean
        self.built += len(todo)
        self.seconds += time.perf_counter() - tick

    def stack(self, examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means (L, B, K, d), mask (B, K))``: the cached means of each example's K pieces, padded."""
        most = max(len(e.write_pieces) for e in examples)
        first = next(iter(self.means.values()))
        means = torch.zeros(first.shape[0], len(examples), most, first.shape[1])  # (L, B, K, d)
        mask = torch.zeros(len(examples), most, dtype=torch.bool)  # (B, K)
        for i, example in enumerate(examples):
            for j, piece in enumerate(example.write_pieces):
                means[:, i, j] = self.means[self.key(piece)]
                mask[i, j] = True
        return means.to(device), mask.to(device)


def empty_state_means(model, pieces: list[torch.Tensor], pad_id: int = 0) -> list[torch.Tensor]:
    """Per piece the ``(L, d)`` mean attention input of every memory layer when it is written from the empty
    state (one batched forward call of the write schedule)."""
    attachment = attachment_of(model)
    cfg = attachment.config
    device = attachment.device(model)
    (call,) = write_schedule.schedule_calls([[p] for p in pieces], pad_id)
    empty = [torch.zeros(len(pieces), cfg.num_heads, cfg.rank, cfg.rank, device=device) for _ in attachment.modules]
    captured: list[torch.Tensor] = []
    handles = [
        attention.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.append(
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            ),
            with_kwargs=True,
        )
        for attention in attention_modules(model)
    ]
    try:
        write_schedule.run_write_calls(model, [call], empty)
    finally:
        for handle in handles:
            handle.remove()
    mask = call.mask.to(device=device, dtype=torch.float32)[:, :, None]  # (B', T, 1)
    means = torch.stack([(x.float() * mask).sum(1) / mask.sum(1) for x in captured], dim=1)  # (B', L, d)
    return list(means.cpu().unbind(0))


def cached_write_pass(model, means: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The SSW write pass from cached means: per layer ONE projection of the K message means and the r x r
    recurrence over them.

    Args:
        means: ``(L, B, K, d)`` from :meth:`MessageInputCache.stack`; mask: ``(B, K)`` true on real messages.

    Returns:
        ``(states, betas)`` like ``objective.write_pass``: per layer the ``(B, H, r, r)`` state (with graph to
        the memory parameters) and the mean write gate over the written messages (the gates of the means, the
        ones the SSW write uses).
    """
    attachment = attachment_of(model)
    cfg = attachment.config
    states, betas = [], []
    weight = mask.to(means.dtype)[:, :, None, None]  # (B, K, 1, 1)
    for position, module in enumerate(attachment.modules):
        q, k, v, beta, lam = module.project(means[position])  # (B, K, H, r) each
        empty = torch.zeros(mask.shape[0], cfg.num_heads, cfg.rank, cfg.rank, device=means.device)
        state, _ = delta_scan_recurrent(empty, q, k, v, beta, mask=mask, lam=lam)  # (B, H, r, r)
        states.append(state)
        betas.append((beta * weight).sum() / (weight.sum() * beta.shape[-1] * beta.shape[-2]).clamp_min(1))
    return states, betas
