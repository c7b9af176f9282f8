"""Backbones: the zoo (the embedded SmolLM2-135M default) and the tiny random test backbone."""

# The one spelling of the default backbone's name (the embedded SmolLM2-135M-Instruct; see backbone_zoo).
DEFAULT_BACKBONE = "smollm2-135m-instruct"
