"""attach_memory / detach_memory on every supported family: identity at start, freezing, errors, counts."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, randomize_memory, tiny_model
from transformers import AutoModelForCausalLM, Qwen3Config

from deltamem_agents import (
    DeltaMemConfig,
    UnsupportedModelError,
    attach_memory,
    detach_memory,
    memory_parameters,
    new_cache,
)


def tokens(batch=2, length=24, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("write", ["token", "segment", "multi"])
def test_zero_init_equals_backbone_over_whole_sequences(family, write):
    model = tiny_model(family)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        attach_memory(model, DeltaMemConfig(correction_init="zero", write=write))
        cache = new_cache(model)
        cache.set_segment_ids(torch.arange(24).div(6, rounding_mode="floor").expand(2, -1))
        got = model(ids, cache=cache).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not cache.memory_state().is_zero()  # the memory was written all the same


@pytest.mark.parametrize("family", FAMILIES)
def test_base_slice_init_equals_backbone_with_writes_off_and_for_one_token(family):
    model = tiny_model(family)
    ids = tokens()
    with torch.no_grad():
        expected_seq = model(ids).logits
        expected_one = model(ids[:, :1]).logits
        attach_memory(model, DeltaMemConfig())  # base_slice: non-zero corrections
        assert any(p.abs().sum() > 0 for n, p in memory_parameters(model).items() if "delta_q" in n)
        got_seq = model(ids, cache=new_cache(model, writes=False)).logits
        got_one = model(ids[:, :1], cache=new_cache(model)).logits
        written = model(ids, cache=new_cache(model)).logits
    assert torch.allclose(got_seq, expected_seq, atol=1e-5)
    assert torch.allclose(got_one, expected_one, atol=1e-5)
    assert not torch.allclose(written, expected_seq, atol=1e-5)  # once written, the memory changes the output


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_original_model_exactly(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    attach_memory(model, DeltaMemConfig())
    randomize_memory(model)
    detach_memory(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not any("forward" in module.__dict__ for module in model.modules())  # projections' own forwards again
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_an_existing_instance_forward_is_wrapped_and_restored():
    model = tiny_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    calls = []

    def wrapper(x):  # as accelerate's hooks do: an instance forward around the class forward
        calls.append(1)
        return type(q_proj).forward(q_proj, x)

    q_proj.forward = wrapper
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        attach_memory(model, DeltaMemConfig(correction_init="zero"))
        assert torch.allclose(model(ids, cache=new_cache(model)).logits, expected, atol=1e-5)
        assert len(calls) == 2  # the wrapper still runs under the memory
        detach_memory(model)
    assert q_proj.__dict__["forward"] is wrapper


def test_only_memory_parameters_train_and_the_backbone_stays_bit_identical():
    model = tiny_model("llama")
    attach_memory(model, DeltaMemConfig())
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if ".deltamem." not in n}
    memory = {n: p.detach().clone() for n, p in model.named_parameters() if ".deltamem." in n}
    assert all(p.requires_grad == (".deltamem." in n) for n, p in model.named_parameters())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(length=16)
    for _ in range(3):
        loss = model(ids, labels=ids, cache=new_cache(model)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in backbone:
            assert torch.equal(param, backbone[name]), name
    changed = [n for n, p in model.named_parameters() if n in memory and not torch.equal(p, memory[n])]
    assert any("memory_q_proj" in n for n in changed) and any("delta_o_proj" in n for n in changed)


def test_unsupported_model_lists_supported_types():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedModelError, match="supported types: gpt2, llama, mistral, qwen2, qwen3, smollm3"):
        attach_memory(model, DeltaMemConfig())


def test_attaching_twice_and_bad_layers_fail_clearly():
    model = tiny_model("llama")
    with pytest.raises(Exception, match="layers"):
        attach_memory(copy.deepcopy(model), DeltaMemConfig(layers=[5]))
    attach_memory(model, DeltaMemConfig(layers=[1]))
    assert all(name.startswith("layers.1.") for name in memory_parameters(model))
    with pytest.raises(Exception, match="already has δ-mem"):
        attach_memory(model, DeltaMemConfig())


@pytest.mark.parametrize("write,expected", [("token", 4_866_336), ("multi", 19_465_344)])
def test_parameter_count_for_qwen3_4b_shapes(write, expected):
    config = Qwen3Config(
        vocab_size=151_936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        attach_memory(model, DeltaMemConfig(write=write, correction_init="zero"))
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected


def test_the_untrained_adapter_is_reproducible_across_instances():
    from deltamem_agents import adapter_fingerprint

    first, second = tiny_model("llama"), tiny_model("llama")
    attach_memory(first, DeltaMemConfig())
    attach_memory(second, DeltaMemConfig())
    assert adapter_fingerprint(first) == adapter_fingerprint(second)
    third = tiny_model("llama")
    attach_memory(third, DeltaMemConfig(init_seed=1))
    assert adapter_fingerprint(third) != adapter_fingerprint(first)
