"""Chat rendering with message boundaries: token ids plus, for every token, the index of the message it belongs
to (what the segment write strategy needs), using the tokenizer's own chat template."""

from dataclasses import dataclass

import torch

from deltamem_agents.core.errors import MessageError
from deltamem_agents.serving.prompts import TOOL_RESULT_PREFIX

NOT_WRITTEN = -1


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation.

    Attributes:
        input_ids: ``(T,)`` token ids.
        message_index: ``(T,)`` index into the rendered messages of each token; -1 for tokens that belong to no
            message (the template's own preamble, e.g. an injected default system prompt, and the generation
            prompt).
        roles: role of each rendered message.
    """

    input_ids: torch.Tensor
    message_index: torch.Tensor
    roles: tuple[str, ...]

    def segment_ids(self, written_roles=("user", "assistant", "tool")) -> torch.Tensor:
        """``(T,)`` segment ids for SSW: message index for messages of ``written_roles``, else -1 (system
        messages and template additions are not written)."""
        ids = self.message_index.clone()
        for i, role in enumerate(self.roles):
            if role not in written_roles:
                ids[ids == i] = NOT_WRITTEN
        return ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def render_chat(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs
) -> RenderedChat:
    """Render ``messages`` (dicts with ``role`` and ``content``) with the tokenizer's chat template.

    Token-to-message assignment uses character offsets of the rendered prefixes, so it is exact whenever the
    template renders each prefix of the conversation as a prefix of the whole (true of common templates). Tokens
    after the point where a template breaks that property are assigned to the last message.
    """
    if not messages:
        raise MessageError("nothing to render: the message list is empty")
    full = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    ends = []
    for i in range(len(messages)):
        prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **template_kwargs)
        ends.append(_common_prefix_length(prefix, full))
    starts = [_message_start(tokenizer, messages, i, full, ends, template_kwargs) for i in range(len(messages))]
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    index = []
    for start, _ in encoded["offset_mapping"]:
        owner = NOT_WRITTEN
        for i in range(len(messages)):
            if starts[i] <= start < ends[i]:
                owner = i
                break
        index.append(owner)
    return RenderedChat(
        input_ids=torch.tensor(encoded["input_ids"], dtype=torch.long),
        message_index=torch.tensor(index, dtype=torch.long),
        roles=tuple(m["role"] for m in messages),
    )


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _message_start(tokenizer, messages, i, full, ends, template_kwargs) -> int:
    """Where message i's text begins: the end of message i-1, or for the first message the end of whatever the
    template puts before it (found by rendering the first message with empty content)."""
    if i > 0:
        return ends[i - 1]
    probe = [{**messages[0], "content": ""}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, **template_kwargs)
    except Exception:  # a template that rejects empty content: the whole preamble counts as message 0
        return 0
    # The preamble is what precedes the message's role header; back off to the last template line break.
    header = rendered.rfind(messages[0]["role"])
    cut = rendered.rfind("\n", 0, max(header, 0)) + 1 if header > 0 else 0
    return min(_common_prefix_length(rendered[:cut], full), ends[0])


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """Chat dicts as this tokenizer's template can render them: templates that know no ``tool`` role (the
    embedded SmolLM2's) get each tool result as a user message starting with ``TOOL_RESULT_PREFIX``."""
    if "tool" in (getattr(tokenizer, "chat_template", None) or ""):
        return messages
    return [
        {"role": "user", "content": TOOL_RESULT_PREFIX + m["content"]} if m["role"] == "tool" else m for m in messages
    ]


def render_prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """``(T,)`` ids of a read prompt: ``messages`` through the template, with the generation prompt."""
    return render_chat(tokenizer, template_messages(tokenizer, messages), add_generation_prompt=True).input_ids
