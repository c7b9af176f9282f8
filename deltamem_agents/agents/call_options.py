"""The keyword arguments a ``DeltaMemChat`` call accepts (LangChain's conventions), checked before a turn runs.

Accepted per call (``invoke(..., **kw)``, ``bind(**kw)``):
  - ``max_new_tokens`` or its LangChain spelling ``max_tokens`` (both given: they must agree);
  - ``temperature``, ``top_p``, ``seed``; ``stop`` is LangChain's own parameter;
  - ``model``: must name the model this chat serves (one local backbone; there is nothing to switch to);
  - from ``bind_tools`` / ``with_structured_output`` / ``create_agent``: ``tools``, ``tool_choice``,
    ``parallel_tool_calls`` (one call per message is decoded either way), ``strict`` (calls always validate:
    they are decoded under their schema), ``ls_structured_output_format``.
Anything else, ``response_format`` included, is refused with an error that says what to do, before the memory is
touched, so a bad call loses nothing.
"""

from deltamem_agents.core.errors import ConfigError

GENERATION_OPTIONS = ("max_new_tokens", "max_tokens", "temperature", "top_p", "seed", "model")
BINDING_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "strict", "ls_structured_output_format")


def resolve_call_options(kwargs: dict, model_name: str, internal: tuple[str, ...] = ()) -> dict:
    """``kwargs`` checked and normalised (``max_tokens`` becomes ``max_new_tokens``; ``model`` is dropped once
    checked). ``internal`` names the library's own keywords that may also be present. Raises ConfigError."""
    unknown = sorted(set(kwargs) - set(GENERATION_OPTIONS) - set(BINDING_OPTIONS) - set(internal))
    if "response_format" in unknown:
        raise ConfigError(
            "DeltaMemChat does not take response_format: for structured output use "
            "chat.with_structured_output(Schema), or create_agent(..., response_format=ToolStrategy(Schema))"
        )
    if unknown:
        raise ConfigError(
            f"DeltaMemChat got unknown call arguments {unknown}; accepted: {list(GENERATION_OPTIONS)} "
            f"(and stop), plus {list(BINDING_OPTIONS)} set by bind_tools / with_structured_output"
        )
    out = dict(kwargs)
    if "max_tokens" in out:
        max_tokens = out.pop("max_tokens")
        if "max_new_tokens" in out and out["max_new_tokens"] != max_tokens:
            raise ConfigError(
                f"max_tokens={max_tokens} and max_new_tokens={out['max_new_tokens']} disagree; pass only one"
            )
        out["max_new_tokens"] = max_tokens
    if "max_new_tokens" in out:
        value = out["max_new_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"max_new_tokens / max_tokens must be a positive integer, got {value!r}")
    if "model" in out:
        model = out.pop("model")
        if model is not None and model != model_name:
            raise ConfigError(
                f"this DeltaMemChat serves {model_name!r} and cannot switch to model={model!r} per call; build "
                f"another one: DeltaMemChat.from_backbone({model!r})"
            )
    return out
