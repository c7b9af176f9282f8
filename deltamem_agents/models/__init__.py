"""Backbones: the zoo (the embedded SmolLM2-135M default) and the tiny random test backbone."""
