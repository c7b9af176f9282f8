"""The write schedule: which tokens go into memory, and how they are grouped into forward calls.

The rule (docs/memory.md, "What is written"):
- every message except system messages is written; system messages stay in every prompt instead;
- a message is rendered ALONE, always the same way: the chat template applied to ``[placeholder system,
  message]``, keeping only the message's own tokens (its role header, text and end-of-turn tokens); the
  placeholder and anything the template adds before the first message are not written;
- each message is written in its own forward call (a message longer than ``max_piece_tokens`` in consecutive
  pieces of that many tokens), starting from a fresh KV cache, the memory state carried from call to call.

So the state after writing m1..mn is a function of those messages alone: however turns, calls or batches
grouped them, the same forward calls run in the same order. The chat, training, evaluation and the benchmarks
all write through :func:`write_messages` / :func:`run_write_calls`, and anything that recomputes a state must too.
"""

from dataclasses import dataclass

import torch

from deltamem_agents.core.attach import attachment_of, decoder_of
from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.core.state import MemoryState
from deltamem_agents.serving.prompts import PLACEHOLDER_SYSTEM
from deltamem_agents.serving.templating import render_chat, template_messages

DEFAULT_PIECE_TOKENS = 1024


@dataclass(frozen=True)
class WriteCall:
    """One forward call of the write schedule, over a batch of conversations.

    Attributes:
        rows: ``(B',)`` the conversations (rows of the batch's state) this call writes.
        ids: ``(B', T)`` token ids, right-padded.
        mask: ``(B', T)`` true on real tokens.
    """

    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def render_for_writing(tokenizer, message: dict) -> torch.Tensor:
    """``(T,)`` the token ids written for one chat message (see the module docstring); the same every time."""
    rendered = render_chat(tokenizer, [PLACEHOLDER_SYSTEM, *template_messages(tokenizer, [message])])
    return rendered.input_ids[rendered.message_index == 1]  # (T,)


def message_pieces(tokenizer, messages: list[dict], max_piece_tokens: int = DEFAULT_PIECE_TOKENS) -> list[torch.Tensor]:
    """The pieces that the schedule writes for ``messages``, in order: one ``(T,)`` tensor per forward call."""
    pieces = []
    for message in messages:
        if message["role"] == "system":
            continue
        ids = render_for_writing(tokenizer, message)  # (T,)
        pieces += [ids[start : start + max_piece_tokens] for start in range(0, ids.shape[0], max_piece_tokens)]
    return [p for p in pieces if p.shape[0] > 0]


def schedule_calls(pieces_per_row: list[list[torch.Tensor]], pad_id: int = 0) -> list[WriteCall]:
    """Batch the pieces of several conversations: call k writes the k-th piece of every row that has one."""
    calls = []
    for k in range(max((len(p) for p in pieces_per_row), default=0)):
        rows = [i for i, pieces in enumerate(pieces_per_row) if len(pieces) > k]
        length = max(pieces_per_row[i][k].shape[0] for i in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B', T)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)  # (B', T)
        for j, i in enumerate(rows):
            piece = pieces_per_row[i][k]
            ids[j, : piece.shape[0]], mask[j, : piece.shape[0]] = piece, True
        calls.append(WriteCall(torch.tensor(rows, dtype=torch.long), ids, mask))
    return calls


def run_write_calls(model, calls: list[WriteCall], states: list[torch.Tensor], observe=None) -> list[torch.Tensor]:
    """Run ``calls`` in order, each from a fresh KV cache, carrying the memory: the schedule's one write path.

    Args:
        model: a causal LM with memory attached.
        calls: from :func:`schedule_calls`.
        states: per memory layer the ``(B, H, r, r)`` state before the first call (B = rows of the batch).
        observe: optional ``observe(call, cache)`` after each call (training uses it to read the layer inputs).

    Returns:
        Per memory layer the ``(B, H, r, r)`` state after the last call; autograd flows through when enabled.
    """
    segment = attachment_of(model).config.write == "segment"
    decoder = decoder_of(model)  # the LM head is not needed: only the state is kept
    device = states[0].device if states else next(model.parameters()).device
    states = list(states)
    for call in calls:
        rows, mask = call.rows.to(device), call.mask.to(device)
        full = call.rows.shape[0] == states[0].shape[0] and bool((call.rows == torch.arange(len(call.rows))).all())
        before = states if full else [s.index_select(0, rows) for s in states]  # L x (B', H, r, r)
        cache = DeltaMemCache.from_states(model, before, writes=True)
        if segment:  # one message piece per row: one segment
            cache.set_segment_ids(torch.where(mask, 0, -1))  # (B', T)
        attention_mask = None if bool(mask.all()) else mask.long()
        decoder(input_ids=call.ids.to(device), attention_mask=attention_mask, cache=cache, use_cache=True)
        after = cache.carrier.states  # L x (B', H, r, r)
        if observe is not None:
            observe(call, cache)
        states = after if full else [s.index_copy(0, rows, a.to(s.dtype)) for s, a in zip(states, after)]
    return states


def write_messages(
    model,
    tokenizer,
    messages: list[dict],
    state: MemoryState | None = None,
    max_piece_tokens: int = DEFAULT_PIECE_TOKENS,
) -> tuple[MemoryState, int]:
    """Write ``messages`` (chat dicts, in order) into ``state`` (default: the empty memory) under the schedule.

    Returns the new state and the number of tokens written. Runs without gradients."""
    attachment = attachment_of(model)
    cfg = attachment.config
    device = attachment.device(model)
    fingerprint = attachment.fingerprint(model)  # hashes the weights' versions: once per call
    if state is None:
        tensor = torch.zeros(len(attachment.layers), 1, cfg.num_heads, cfg.rank, cfg.rank)  # (L, 1, H, r, r)
    else:
        state.check_compatible(fingerprint, attachment.layers)
        tensor = state.tensor
    pieces = message_pieces(tokenizer, messages, max_piece_tokens)
    if not pieces:
        return state or MemoryState(tensor, fingerprint, attachment.layers), 0
    with torch.no_grad():
        states = run_write_calls(model, schedule_calls([pieces]), list(tensor.to(device, torch.float32).unbind(0)))
    written = torch.stack([s.detach().float().cpu() for s in states])  # (L, 1, H, r, r)
    return MemoryState(written, fingerprint, attachment.layers), sum(p.shape[0] for p in pieces)
