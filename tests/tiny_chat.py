"""A tiny chat stack for fast tests: a character-level tokenizer with a ChatML template, a tiny random llama,
and a way to script what the model says (through the real decoding, grammar and parsing path)."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from deltamem_agents import DeltaMemConfig, attach_memory
from deltamem_agents.engine import MemoryEngine

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_level_tokenizer(chars, template: str, vocab_size: int | None = None, pad_token: str | None = None):
    """Specials ``<unk>``, ``<|im_start|>``, ``<|im_end|>`` then one token per character of ``chars`` (at most
    ``vocab_size`` tokens in all), with ``template`` as the chat template."""
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
    return char_level_tokenizer(CHARS, CHATML)


def tiny_lm(seed: int = 0):
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


def tiny_engine(seed: int = 0, write: str = "token", trained: bool = True, max_context: int | None = None):
    """An engine over a tiny random llama. ``trained``: memory parameters set to non-trivial values (so states and
    replies depend on what was written), else the default zero-init corrections."""
    model = tiny_lm(seed)
    attach_memory(model, DeltaMemConfig(write=write, correction_init="base_slice" if trained else "zero"))
    if trained:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".deltamem." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3 - (1.0 if "bias" in name else 0))
    return MemoryEngine(model, tiny_tokenizer(), max_context=max_context)


class Script:
    """Makes the model say ``text`` (then end its turn), by adding a large bias to each next scripted token's
    logit. Decoding, grammar masking and parsing stay the real ones."""

    def __init__(self, engine: MemoryEngine, text: str):
        self.ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
        self.step = 0
        self.handle = engine.model.lm_head.register_forward_hook(self._bias)

    def _bias(self, module, args, output):
        token = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        output = output.clone()
        output[:, -1, token] += 1000.0
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


CHATML_PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """Characters as tokens within the tiny models' 97-token vocabulary (tests/tiny_models.py), specials
    ``<|im_start|>`` / ``<|im_end|>``, a ChatML template without a default system prompt."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,?!'=#-"
    return char_level_tokenizer(chars, CHATML_PLAIN, pad_token="<unk>")
