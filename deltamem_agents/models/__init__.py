"""Backbones: the zoo (the embedded SmolLM2-135M default) and the tiny random test backbone."""

# The one spelling of the default backbone's name (the embedded SmolLM2-135M-Instruct; see backbone_zoo).
DEFAULT_BACKBONE = "smollm2-135m-instruct"
# The tiny random test backbone (deltamem_agents.models.tiny_backbone), loadable by name for tests and doc runs.
TINY_BACKBONE = "tiny"
# Environment variable naming the backbone that load_backbone() / DeltaMemChat.from_backbone() use by default.
BACKBONE_ENV = "DELTAMEM_BACKBONE"


def default_backbone() -> str:
    """The backbone used when none is named: ``$DELTAMEM_BACKBONE`` if set, else the embedded default."""
    import os

    return os.environ.get(BACKBONE_ENV) or DEFAULT_BACKBONE
