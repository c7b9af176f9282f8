"""Training δ-mem adapters: episode data, batching, the objective, checkpoints and the training loop."""
