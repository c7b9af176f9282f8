"""Slow: the embedded default backbone loads, answers a short chat, and is unchanged by an empty memory."""

import pytest
import torch

from deltamem_agents import DeltaMemConfig, attach_memory, new_cache
from deltamem_agents.models.backbone_zoo import load_backbone

pytestmark = pytest.mark.slow


def test_embedded_backbone_answers_a_short_chat():
    model, tokenizer = load_backbone()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(plain[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    attach_memory(model, DeltaMemConfig())
    with torch.no_grad():
        with_memory = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            cache=new_cache(model, writes=False),
        )
    assert with_memory.tolist() == plain.tolist()
