"""Tool calls that always parse: a JSON envelope grammar built from the bound tools' schemas.

The model answers with ONE JSON object, constrained token by token by xgrammar:
    {"action": "reply", "text": "..."}                       a plain answer (only when tool_choice allows it)
    {"action": "<tool name>", "arguments": {...schema...}}   a tool call
so the choice between answering and calling a tool is part of the grammar, and every call validates against its
tool's JSON schema. Models whose chat template cannot be trusted with tools (the embedded SmolLM2) need this.
"""

import json
import logging
import uuid
from dataclasses import dataclass
from functools import lru_cache

from deltamem_agents.core.errors import ConfigError

log = logging.getLogger(__name__)
REPLY_ACTION = "reply"
ARGUMENTS_HEAD = '"arguments": '  # what precedes a tool call's arguments in the envelope
ACTION_HEAD = '{"action": "'  # how every envelope begins (the grammar admits no other spacing)
REPLY_HEAD = ACTION_HEAD + 'reply", "text": "'  # how every reply envelope begins


@dataclass(frozen=True)
class ToolSpec:
    """One bound tool: name, description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ParsedReply:
    """What the model produced: text, or one tool call (name, args, id)."""

    text: str
    tool_calls: tuple[dict, ...] = ()


def tool_specs(openai_tools: list[dict]) -> list[ToolSpec]:
    """ToolSpecs from OpenAI-format tool dicts (what ``convert_to_openai_tool`` returns)."""
    specs = []
    for tool in openai_tools:
        function = tool.get("function", tool)
        name = function["name"]
        if name == REPLY_ACTION:
            raise ConfigError(f"a tool may not be named {REPLY_ACTION!r}: that action is reserved for plain replies")
        params = function.get("parameters") or {"type": "object", "properties": {}}
        specs.append(ToolSpec(name, function.get("description", ""), params))
    return specs


def ground(specs: list[ToolSpec], values: dict[str, dict[str, list]]) -> list[ToolSpec]:
    """Specs whose grounded arguments admit only live values: ``values`` maps a tool name to ``{argument:
    allowed values}`` (what the tool's value providers returned this turn). The argument's schema becomes an
    ``enum`` of those values (so the grammar allows nothing else); a tool with an argument whose list is empty is
    dropped (it is not offered this turn). Tools not in ``values`` are kept as they are."""
    out = []
    for spec in specs:
        live = values.get(spec.name)
        if not live:
            out.append(spec)
            continue
        if any(not allowed for allowed in live.values()):
            continue
        properties = dict(spec.parameters.get("properties") or {})
        for arg, allowed in live.items():
            if arg not in properties:
                raise ConfigError(f"value provider for {spec.name}.{arg}: the tool has no argument {arg!r}")
            properties[arg] = {**properties[arg], "enum": list(dict.fromkeys(allowed))}
        out.append(ToolSpec(spec.name, spec.description, {**spec.parameters, "properties": properties}))
    return out


def allowed_actions(specs: list[ToolSpec], tool_choice) -> tuple[list[ToolSpec], bool]:
    """The tools the grammar admits and whether a plain reply is allowed, from LangChain's ``tool_choice``:
    None / "auto", "none", "any" / "required" / True, a tool name, or a dict naming one tool in OpenAI's
    (``{"type": "function", "function": {"name": ...}}``) or Anthropic's (``{"type": "tool", "name": ...}``)
    form, or ``{"type": "auto" | "any" | "none"}``. Anything else raises ConfigError saying what is accepted."""
    bound = [s.name for s in specs]
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("auto", "any", "none", "required"):
            tool_choice = kind
        else:
            name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
            if not isinstance(name, str):
                raise ConfigError(
                    f"tool_choice {tool_choice!r} names no tool; use {{'type': 'function', 'function': "
                    f"{{'name': <tool>}}}} or {{'type': 'tool', 'name': <tool>}} with one of {bound}"
                )
            tool_choice = name
    if tool_choice in (None, "auto"):
        return specs, True
    if tool_choice == "none":
        return [], True  # reply only (still inside the envelope, as the model saw earlier turns)
    if tool_choice in ("any", "required", True):
        if not specs:
            raise ConfigError(
                f"tool_choice={tool_choice!r} needs at least one bound tool, and none is bound; bind tools or use "
                "tool_choice='auto'"
            )
        return specs, False
    if not isinstance(tool_choice, str):
        raise ConfigError(
            f"tool_choice {tool_choice!r} is not understood; use 'auto', 'none', 'any', a tool name or a dict "
            "naming one tool"
        )
    chosen = [s for s in specs if s.name == tool_choice]
    if not chosen:
        raise ConfigError(f"tool_choice names {tool_choice!r}, which is not a bound tool; bound: {bound}")
    return chosen, False


def preselect(specs: list[ToolSpec], request: str, keep: int) -> list[ToolSpec]:
    """The ``keep`` tools whose name and description best match ``request`` lexically (BM25), in bound order.
    Small models choose among few tools far better than among many; with no word in common, all tools stay."""
    from rank_bm25 import BM25Plus

    from deltamem_agents.serving.retrieval import words

    query = words(request)
    documents = [words(f"{s.name.replace('_', ' ')} {s.description}") for s in specs]
    if keep >= len(specs) or not query or not any(set(query) & set(d) for d in documents):
        return specs
    scores = BM25Plus(documents).get_scores(query)
    best = sorted(range(len(specs)), key=lambda i: -scores[i])[:keep]
    return [specs[i] for i in sorted(best)]


def envelope_schema(specs: list[ToolSpec], allow_reply: bool) -> dict:
    """JSON schema of the envelope: one alternative per tool, plus the reply alternative if allowed."""
    if not specs and not allow_reply:
        raise ConfigError("nothing to decode: no tool allowed and no reply allowed")
    options = [
        {
            "type": "object",
            "properties": {"action": {"const": s.name}, "arguments": _strict(s.parameters)},
            "required": ["action", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    if allow_reply:
        options.append(
            {
                "type": "object",
                "properties": {"action": {"const": REPLY_ACTION}, "text": {"type": "string", "minLength": 1}},
                "required": ["action", "text"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def instructions(specs: list[ToolSpec], allow_reply: bool) -> str:
    """System-prompt text that tells the model the envelope format and lists the tools. With no tool allowed it
    is empty: the grammar writes the reply's envelope head itself, and instructions about tools or JSON made the
    small model write about them ("This is a JSON object that contains ...") instead of answering."""
    if not specs:
        return ""
    lines = ["You can use these tools:"]
    for s in specs:
        args = ", ".join(_describe_arg(k, v) for k, v in (s.parameters.get("properties") or {}).items())
        lines.append(f"- {s.name}({args}): {s.description}".rstrip(": "))
    lines.append('To call a tool, answer with {"action": "<tool name>", "arguments": {...}}.')
    if allow_reply:
        lines.append('To answer the user directly, answer with {"action": "reply", "text": "<your answer>"}.')
    lines.append("Answer with exactly one JSON object.")
    return "\n".join(lines)


def _describe_arg(name: str, schema: dict) -> str:
    """``name: type`` or ``name: one of ...``, then the argument's description in parentheses when the schema
    has one (LangChain puts a tool's docstring ``Args:`` there with ``@tool(parse_docstring=True)``)."""
    if "enum" in schema:
        head = f"{name}: one of {', '.join(json.dumps(v) for v in schema['enum'])}"
    else:
        head = f"{name}: {schema.get('type', 'any')}"
    note = str(schema.get("description") or "").strip().rstrip(".")
    return f"{head} ({note})" if note else head


def compile_envelope(tokenizer, vocab_size: int, schema: dict):
    """The compiled xgrammar grammar of ``schema`` for this tokenizer (cached per tokenizer and schema)."""
    return _compiler(tokenizer, vocab_size).compile_json_schema(json.dumps(schema), any_whitespace=False)


@lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int):
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))


def parse_envelope(text: str, specs: list[ToolSpec]) -> ParsedReply:
    """Parse the model's output. Anything that is not a valid envelope becomes plain text with a warning."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        salvaged = _truncated_reply(text)
        if salvaged is not None:
            return ParsedReply(text=salvaged)
        log.warning("model output is not a JSON tool envelope; returning it as text: %.200s", text)
        return ParsedReply(text=text)
    if not isinstance(data, dict):
        log.warning("model output is JSON but not an object; returning it as text")
        return ParsedReply(text=text)
    action = data.get("action")
    if action == REPLY_ACTION and isinstance(data.get("text"), str):
        return ParsedReply(text=data["text"])
    known = {s.name for s in specs}
    if action in known and isinstance(data.get("arguments"), dict):
        call = {"name": action, "args": data["arguments"], "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
        return ParsedReply(text="", tool_calls=(call,))
    log.warning("model output names no bound tool (action %r); returning it as text", action)
    return ParsedReply(text=text)


def partial_reply_text(text: str) -> str | None:
    """While a reply envelope is being decoded, the part of its text that is complete so far (for streaming)."""
    return _truncated_reply(text)


def _truncated_reply(text: str) -> str | None:
    """The text of a reply envelope cut off by the token limit (``{"action": "reply", "text": "...``)."""
    if not text.startswith(REPLY_HEAD):
        return None
    body = text[len(REPLY_HEAD) :].rstrip("\\")  # a dangling escape cannot be completed
    try:
        return json.loads('"' + body + '"')
    except json.JSONDecodeError:
        return None


def render_tool_call(call: dict) -> str:
    """How an earlier tool call appears in the prompt: the same envelope the model writes."""
    return json.dumps({"action": call["name"], "arguments": call.get("args", {})})


# A string argument without its own maxLength gets this one, so a rambling model cannot run a call past the
# token limit (a cut-off call would be lost as text).
DEFAULT_MAX_STRING = 200
MAX_INTEGER = 10**12 - 1  # integers in tool arguments have at most 12 digits


def _strict(schema: dict) -> dict:
    """Copy of a JSON schema where objects admit no extra keys, strings have a length cap and integers at most
    12 digits (what the grammar should allow)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if isinstance(v, dict) else v for k, v in schema.items()}
    if out.get("type") == "string" and "enum" not in out:
        out.setdefault("maxLength", DEFAULT_MAX_STRING)
    if out.get("type") == "integer" and "enum" not in out:  # at most 12 digits, so a number cannot run on
        out.setdefault("minimum", -MAX_INTEGER)
        out.setdefault("maximum", MAX_INTEGER)
    if out.get("type") == "object" and "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(v) for v in out[key]]
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    return out
