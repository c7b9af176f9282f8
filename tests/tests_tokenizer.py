"""A shared cached instance of the tiny ChatML tokenizer."""

from functools import lru_cache

from tiny_chat import tiny_tokenizer


@lru_cache(maxsize=1)
def chatml_tokenizer():
    return tiny_tokenizer()
