"""Tool choice by likelihood: the backbone scores every allowed action, and the best one is decoded.

A 135M model asked to write ``{"action": ...}`` under a grammar picks a tool little better than chance and
almost never decides to call one under ``tool_choice="auto"`` (docs/tool-choice.md). Scoring is easier for it
than generating: for each allowed action we ask how likely the model finds the conversation's newest user
message when it is told that the user wants that action (a "channel" score, log p(request | action)), and take
the action with the highest score. The plain reply is one more action, described in :data:`REPLY_DESCRIPTION`,
so "reply or call" is decided the same way. Then the envelope is decoded under the grammar restricted to the
chosen action: the model still writes the arguments and the reply text itself.

With a tool-choice head (``serving.choice_head``: a linear read-out of the hidden states of those same
forwards, trained on generated requests over tool sets of other domains), each action's score is
``channel_weight * channel + head``.

After a tool result (the turn already called a tool), the user message is no new evidence; there the model
scores the start of each envelope (``{"action": "<name>"``) given the whole prompt, tool result included.

Everything here reads the memory with writes off, in one forward per action; no text is generated.
"""

from dataclasses import dataclass

import torch

from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.core.state import MemoryState
from deltamem_agents.serving.templating import render_chat, template_messages
from deltamem_agents.serving.tool_grammar import ACTION_HEAD, REPLY_ACTION, ToolSpec

REPLY_DESCRIPTION = (
    "Answer the user directly in words: greetings, thanks, small talk, or a question that none of the tools can answer."
)
ACTION_INTRO = "The user's message asks for this action: "


@dataclass(frozen=True)
class ActionChoice:
    """The chosen action (a tool name or ``"reply"``) and every action's score (sum of log-probabilities)."""

    action: str
    scores: dict[str, float]
    method: str  # "channel", "channel+head", "envelope" (after a tool result) or "only" (one action allowed)


def choose_action(
    engine,
    state,
    messages: list[dict],
    specs: list[ToolSpec],
    allow_reply: bool,
    prompt_ids: torch.Tensor | None = None,
    reply_bias: float = 0.0,
    head=None,
) -> ActionChoice:
    """Choose among ``specs`` (and the reply, if allowed) for the conversation ``messages`` (chat dicts: the
    system message first, then the window; the tool instructions are not needed). ``prompt_ids`` is the rendered
    prompt of the turn, used after a tool result. ``reply_bias`` is added to the reply's score. With a choice
    ``head`` the channel score becomes ``head.channel_weight * channel + head`` (same forwards)."""
    actions = [s.name for s in specs] + ([REPLY_ACTION] if allow_reply else [])
    if len(actions) == 1:
        return ActionChoice(actions[0], {actions[0]: 0.0}, "only")
    if messages and messages[-1]["role"] == "tool" and prompt_ids is not None:
        scores = envelope_scores(engine, state, prompt_ids, actions)
        method = "envelope"
    elif head is not None:
        channel, learned = channel_and_head_scores(engine, state, messages, specs, allow_reply, head)
        scores = {a: head.channel_weight * channel[a] + learned[a] for a in channel}
        method = "channel+head"
    else:
        scores = channel_scores(engine, state, messages, specs, allow_reply)
        method = "channel"
    if REPLY_ACTION in scores:
        scores[REPLY_ACTION] += reply_bias
    best = max(actions, key=lambda a: scores[a])
    return ActionChoice(best, scores, method)


def describe(spec: ToolSpec | None) -> str:
    """How an action is described to the model when scoring: its name, the names of its arguments and its
    description, e.g. "comment on ticket (ticket id, comment): Add a note to a ticket." (the reply: its own).
    The argument names were chosen on the request set's tune half: 35/47 right tools under "any" against 33/47
    with name and description alone, no reply item lost (docs/tool-choice.md)."""
    if spec is None:
        return f"{REPLY_ACTION}: {REPLY_DESCRIPTION}"
    arguments = ", ".join(name.replace("_", " ") for name in spec.parameters.get("properties") or {})
    head = spec.name.replace("_", " ") + (f" ({arguments})" if arguments else "")
    return f"{head}: {spec.description}".rstrip(": ")


def channel_sequences(tokenizer, messages: list[dict], options: list) -> list[tuple[torch.Tensor, int]]:
    """One ``(ids, start)`` per option (a ToolSpec, or None for the reply): the system message plus "the user
    asks for <action>", then the conversation up to and including its newest user message, whose tokens start at
    ``start``. The sequence ends with the newest user message's last token."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    users = [i for i, m in enumerate(rest) if m["role"] == "user"]
    if not users:
        raise ValueError("channel scoring needs a user message")
    rest = template_messages(tokenizer, rest[: users[-1] + 1])
    sequences = []
    for spec in options:
        head = "\n".join(system + [ACTION_INTRO + describe(spec)])
        rendered = render_chat(tokenizer, [{"role": "system", "content": head}, *rest])
        positions = (rendered.message_index == len(rest)).nonzero().flatten()  # the newest user message
        sequences.append((rendered.input_ids[: int(positions[-1]) + 1], int(positions[0])))
    return sequences


def _options(specs: list[ToolSpec], allow_reply: bool) -> list[ToolSpec | None]:
    """The actions to score: each tool's spec, then None for the reply when it is allowed."""
    return [*specs, *([None] if allow_reply else [])]


def _action_name(option: ToolSpec | None) -> str:
    return option.name if option is not None else REPLY_ACTION


def channel_scores(engine, state, messages: list[dict], specs: list[ToolSpec], allow_reply: bool) -> dict[str, float]:
    """log p(newest user message | the system message plus "the user asks for <action>") for every action."""
    options = _options(specs, allow_reply)
    logprobs = batch_sequence_logprobs(engine, state, channel_sequences(engine.tokenizer, messages, options))
    return {_action_name(option): sum(lp) for option, lp in zip(options, logprobs)}


def channel_features(engine, state, messages, options: list, layers) -> tuple[list[float], torch.Tensor]:
    """For each option (a ToolSpec, None: the reply): its channel score and the hidden states of ``layers`` at
    its channel sequence's last token, concatenated, (A, F); one forward for all."""
    sequences = channel_sequences(engine.tokenizer, messages, options)
    logprobs, hidden = _batch_forward(engine, state, sequences, hidden_states=True)
    rows = torch.arange(len(sequences), device=hidden[0].device)
    last = torch.tensor([ids.shape[0] - 1 for ids, _ in sequences], device=hidden[0].device)  # (A,)
    features = torch.cat([hidden[i][rows, last].float() for i in layers], dim=-1)  # (A, F), on the model's device
    return [sum(lp) for lp in logprobs], features.cpu()


def channel_and_head_scores(engine, state, messages, specs: list[ToolSpec], allow_reply: bool, head):
    """(channel scores, head scores) of every action from the same forward (``serving.choice_head``)."""
    options = _options(specs, allow_reply)
    channel, features = channel_features(engine, state, messages, options, head.layers)
    learned = head.score(features, torch.tensor([o is None for o in options])).tolist()
    names = [_action_name(option) for option in options]
    return dict(zip(names, channel)), dict(zip(names, learned))


def envelope_scores(engine, state, prompt_ids: torch.Tensor, actions: list[str]) -> dict[str, float]:
    """log p(``{"action": "<name>"``) after the prompt, counting only the name and its closing quote."""
    skip = len(engine.tokenizer(ACTION_HEAD, add_special_tokens=False)["input_ids"])
    texts = [engine.tokenizer(f'{ACTION_HEAD}{a}"', add_special_tokens=False)["input_ids"] for a in actions]
    logprobs = continuation_logprobs(engine, state, prompt_ids, texts)
    return {a: sum(lp[skip:]) for a, lp in zip(actions, logprobs)}


def sequence_logprobs(engine, state, ids: torch.Tensor, start: int) -> list[float]:
    """Log-probabilities of ``ids[start:]`` given what precedes them, in one forward (memory read, not written)."""
    with engine.lock, torch.no_grad():
        cache = DeltaMemCache(engine.model, state or engine.empty_state(), writes=False)
        logits = engine.model(ids[None].to(engine.device), cache=cache).logits[0].float()  # (T, V)
    logprobs = logits.log_softmax(-1)
    targets = ids[start:].to(logprobs.device)  # (T - start,)
    return logprobs[start - 1 : len(ids) - 1].gather(1, targets[:, None]).flatten().tolist()


def batch_sequence_logprobs(engine, state, sequences: list[tuple[torch.Tensor, int]]) -> list[list[float]]:
    """:func:`sequence_logprobs` of several ``(ids, start)`` pairs in one right-padded batch. Causal attention
    and a read-only memory mean a token never sees the padding after it, so no attention mask is needed."""
    return _batch_forward(engine, state, sequences)[0]


def _batch_forward(engine, state, sequences, hidden_states: bool = False) -> tuple[list[list[float]], tuple | None]:
    """The per-token log-probabilities of :func:`batch_sequence_logprobs`, and with ``hidden_states`` the
    model's hidden states (a tuple of (B, T, H) on the model's device, 0 = embeddings) of the same forward."""
    if not sequences:
        return [], None
    state = state or engine.empty_state()
    length = max(ids.shape[0] for ids, _ in sequences)
    batch = torch.zeros(len(sequences), length, dtype=torch.long)  # (B, T) right-padded with token 0
    for row, (ids, _) in enumerate(sequences):
        batch[row, : ids.shape[0]] = ids
    with engine.lock, torch.no_grad():
        cache = DeltaMemCache(engine.model, MemoryState.stack([state] * len(sequences)), writes=False)
        output = engine.model(batch.to(engine.device), cache=cache, output_hidden_states=hidden_states)
        logprobs = output.logits.float().log_softmax(-1)  # (B, T, V)
    out = []
    for row, (ids, start) in enumerate(sequences):
        targets = ids[start:].to(logprobs.device)
        out.append(logprobs[row, start - 1 : ids.shape[0] - 1].gather(1, targets[:, None]).flatten().tolist())
    return out, (output.hidden_states if hidden_states else None)


def continuation_logprobs(engine, state, prompt_ids: torch.Tensor, continuations: list[list[int]]) -> list[list[float]]:
    """Per-token log-probabilities of each continuation after ``prompt_ids``: the prompt runs once, and the KV
    cache is cropped back to it after each continuation (the memory is read-only, so nothing else changes)."""
    out = []
    with engine.lock, torch.no_grad():
        cache = DeltaMemCache(engine.model, state or engine.empty_state(), writes=False)
        last = engine.model(prompt_ids[None].to(engine.device), cache=cache).logits[0, -1].float().log_softmax(-1)
        length = cache.get_seq_length()
        for ids in continuations:
            scores = [float(last[ids[0]])]
            if len(ids) > 1:
                step = torch.tensor([ids[:-1]], device=engine.device)  # (1, n - 1)
                logits = engine.model(step, cache=cache).logits[0].float().log_softmax(-1)  # (n - 1, V)
                scores += logits.gather(1, torch.tensor(ids[1:], device=logits.device)[:, None]).flatten().tolist()
                cache.crop(-(cache.get_seq_length() - length))
            out.append(scores)
    return out
