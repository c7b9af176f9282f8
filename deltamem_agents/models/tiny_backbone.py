"""A tiny random backbone for load runs, smoke tests and examples; it produces gibberish.

A llama with hidden size 32 and 2 layers, built from a config (no download, no weights file) with seeded random
weights, a character-level tokenizer (one token per printable ASCII character) with a ChatML template, and δ-mem
attached. Everything is deterministic in the seed: the same seed gives the same weights, byte for byte, in every
process. It exercises the whole stack (tokenizer, template, write pass, decoding, graph, checkpoints) at a tiny
fraction of a real model's cost, so what a run on it measures is the machinery around the model, not the model.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from deltamem_agents.core.attach import attach_memory
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.serving.engine import MemoryEngine

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML with a default system prompt ("Be brief.") when the conversation has none."""
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
"""The special tokens, ids 0, 1, 2 (unknown, start of a message, end of a message / end of turn)."""
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
"""The characters of the tiny tokenizer: printable ASCII and the newline."""


def char_level_tokenizer(
    chars, template: str, vocab_size: int | None = None, pad_token: str | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer with the specials ``<unk>``, ``<|im_start|>``, ``<|im_end|>`` (ids 0, 1, 2) then one token per
    character of ``chars`` (at most ``vocab_size`` tokens in all), with ``template`` as the chat template.
    ``<|im_end|>`` is the end-of-sequence token; characters not in ``chars`` become ``<unk>``."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for ch in chars:
        if vocab_size is None or len(vocab) < vocab_size:
            vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    extra = {"pad_token": pad_token} if pad_token else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", **extra)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tokenizer.chat_template = template
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny backbone's tokenizer: :data:`CHARS` as tokens, the :data:`CHATML` template."""
    return char_level_tokenizer(CHARS, CHATML)


def tiny_lm(seed: int = 0):
    """A random llama (hidden 32, 2 layers, 4 heads, 2 KV heads, eager attention) seeded with ``seed``, in eval
    mode, without memory. Note: it seeds torch's global generator (``torch.manual_seed``)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_engine(
    seed: int = 0, write: str = "token", trained: bool = True, max_context: int | None = None
) -> MemoryEngine:
    """A :class:`MemoryEngine` over :func:`tiny_lm` with memory attached (``write``: "token" for TSW, "multi" for
    MSW). ``trained``: the memory parameters are set to seeded non-trivial values (so states and replies depend
    on what was written), else they keep the default zero-init corrections. Wrap it as
    ``DeltaMemChat(engine=tiny_engine())``."""
    model = tiny_lm(seed)
    attach_memory(model, DeltaMemConfig(write=write, correction_init="base_slice" if trained else "zero"))
    if trained:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".deltamem." in name:
                    noise = torch.randn(param.shape, generator=generator)  # same shape as param
                    param.copy_(noise * 0.3 - (1.0 if "bias" in name else 0))
    return MemoryEngine(model, tiny_tokenizer(), max_context=max_context)
