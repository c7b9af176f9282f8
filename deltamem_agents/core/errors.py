"""Error types of deltamem-agents: every failure we detect is one of these, with a message that says what
was wrong and what to do."""


class DeltaMemError(Exception):
    """Base class of every error raised on purpose by deltamem-agents."""


class ConfigError(DeltaMemError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class UnsupportedModelError(DeltaMemError, TypeError):
    """The backbone's architecture is not in the table of supported model types."""


class MemoryStateError(DeltaMemError, ValueError):
    """Memory-state bytes or tensors are corrupted, truncated, foreign or non-finite."""


class AdapterError(DeltaMemError, ValueError):
    """An adapter could not be attached, saved or loaded (missing files, wrong shapes, wrong backbone)."""


class BackboneError(DeltaMemError, RuntimeError):
    """A backbone could not be found or loaded."""


class MessageError(DeltaMemError, ValueError):
    """Messages that cannot be used for a turn (empty list, unknown role, no user message)."""


class LoadRunError(DeltaMemError, RuntimeError):
    """A load run (``deltamem bench-load``) could not start or finish: the database is unreachable, the
    arguments are invalid, or a worker failed to load its backbone."""
