"""Named training recipes: complete TrainConfigs for a backbone, chosen with ``deltamem train --recipe NAME``.

The library-wide defaults stay where they are defined (``DeltaMemConfig()``: the paper's adapter; ``TrainConfig()``:
the trainer's); a recipe is a named, documented deviation from them, measured on one backbone.
"""

from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.train.trainer import TrainConfig

RECIPES: dict[str, TrainConfig] = {
    # The embedded SmolLM2-135M on one CPU core (issue 11's diagnostic run: the training-batch control gap rose
    # from +0.001 to +0.47 nats in 80 steps on closed-colour data; it did not transfer to other phrasings).
    "smollm2-135m-ssw": TrainConfig(
        memory=DeltaMemConfig(
            write="segment", forget_gate="separate", beta_bias_init=-1.0, lambda_bias_init=5.0, correction_gain=0.5
        ),
        batch_size=8,
        lr=1e-2,
        contrastive_weight=1.0,
        margin=1.0,
    ),
}
