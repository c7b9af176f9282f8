"""Tiny random models of every supported family, built from configs (no downloads)."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from deltamem_agents import DeltaMemConfig
from deltamem_agents.core.backbones import AttentionShapes
from deltamem_agents.core.memory_layer import MemoryLayer

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=8),
    "smollm3": lambda: SmolLM3Config(**COMMON),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    """A random causal LM of ``family`` in eval mode with eager attention."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def randomize_memory(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every memory parameter non-trivial values, so reads and corrections really matter."""
    from deltamem_agents import memory_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in memory_parameters(model).items():
            noise = torch.randn(param.shape, generator=generator) * scale
            if name.endswith("beta_bias"):
                noise = noise - 1.0
            param.copy_(noise.to(param.dtype))


# One memory layer on its own, for the tests of its compute paths (tests/test_memory_layer.py, test_fast_paths.py).
LAYER_SHAPES = AttentionShapes(hidden=24, q_out=24, k_out=12, v_out=12, o_out=24)


def memory_layer(write="token", forget_gate="tied", corrections="qo", seed=0) -> MemoryLayer:
    """A float64 MemoryLayer (r = 4, 3 states for ``multi``) with every parameter moved off its init, so gates and
    corrections (which start at 0) make every path non-trivial. Seeds torch's global generator."""
    torch.manual_seed(seed)
    config = DeltaMemConfig(write=write, forget_gate=forget_gate, corrections=corrections, rank=4, num_states=3)
    memory = MemoryLayer(config, LAYER_SHAPES).double()
    with torch.no_grad():
        for param in memory.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return memory


def rel_err(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
