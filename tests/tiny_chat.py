"""A tiny chat stack for fast tests: the library's tiny random backbone (``deltamem_agents.models.tiny_backbone``: a
character-level tokenizer with a ChatML template, a tiny random llama, an engine over it), and a way to script what
the model says (through the real decoding, grammar and parsing path)."""

from deltamem_agents.models.tiny_backbone import (  # noqa: F401 - re-exported for the tests
    CHARS,
    CHATML,
    SPECIALS,
    char_level_tokenizer,
    tiny_engine,
    tiny_lm,
    tiny_tokenizer,
)
from deltamem_agents.serving.engine import MemoryEngine


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


class VocabTokens:
    """A tokenizer stand-in over an explicit vocabulary (a list of token texts): enough for the logits
    processors, which only decode ids (``len`` and ``decode``)."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)
