"""MemoryLayer.forward (every compute path) equals forward_reference: corrections, states and gradients; the one
path table; the public helpers (gates, decoder_of, attention_modules, DeltaMemCache.from_states)."""

import pytest
import torch
from tiny_models import LAYER_SHAPES as SHAPES
from tiny_models import memory_layer as layer
from tiny_models import rel_err

from deltamem_agents import DeltaMemConfig, attach_memory, new_cache
from deltamem_agents.core.memory_layer import RECURRENT_MAX_TOKENS, ComputePath, choose_path

STRATEGIES = ["token", "segment", "multi"]


def inputs(memory, batch, length, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, r = memory.config.num_heads, memory.config.rank
    x = torch.randn(batch, length, SHAPES.hidden, generator=g, dtype=torch.float64)
    state = torch.randn(batch, h, r, r, generator=g, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, : max(1, length // 3)] = False  # left padding on the first example
    segment_ids = (torch.arange(length) * 3 // max(length, 1)).repeat(batch, 1)  # three messages
    segment_ids[:, -1:] = -1  # a template suffix: not written
    return x, state, mask, segment_ids


@pytest.mark.parametrize("write", STRATEGIES)
@pytest.mark.parametrize("forget_gate", ["tied", "separate"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("length", [1, 5, 37])
@pytest.mark.parametrize("writes", [True, False])
def test_forward_equals_the_reference_with_gradients(write, forget_gate, padded, length, writes):
    memory = layer(write, forget_gate)
    x, state, mask, segment_ids = inputs(memory, 2, length, padded)
    x.requires_grad_(True)
    state.requires_grad_(True)
    leaves = [x, state, *memory.parameters()]
    results = {}
    for name, fn in (("fast", memory.forward), ("reference", memory.forward_reference)):
        corrections, new_state = fn(x, state, writes, mask=mask, segment_ids=segment_ids)
        g = torch.Generator().manual_seed(1)  # the same random loss weights for both
        loss = sum((c * torch.randn(c.shape, generator=g, dtype=c.dtype)).sum() for c in corrections.values())
        loss = loss + (new_state * torch.randn(new_state.shape, generator=g, dtype=new_state.dtype)).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results[name] = corrections, new_state, grads
    (fast, fast_state, fast_grads), (ref, ref_state, ref_grads) = results["fast"], results["reference"]
    assert set(fast) == set(ref) == {"q", "o"}
    for key in ref:
        assert fast[key].shape == ref[key].shape and rel_err(fast[key], ref[key]) < 1e-10
    assert rel_err(fast_state, ref_state) < 1e-10
    for got, want in zip(fast_grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got, want) < 1e-8


@pytest.mark.parametrize("write", ["token", "multi"])
def test_forward_without_grad_and_with_kv_corrections(write):
    memory = layer(write, corrections="qkvo")
    x, state, mask, _ = inputs(memory, 3, 20, padded=True)
    with torch.no_grad():
        for length in (1, 20):
            fast, fast_state = memory(x[:, :length], state, True, None if length == 1 else mask)
            ref, ref_state = memory.forward_reference(x[:, :length], state, True, None if length == 1 else mask)
            assert set(fast) == {"q", "k", "v", "o"}
            for key in ref:
                assert rel_err(fast[key], ref[key]) < 1e-12
            assert rel_err(fast_state, ref_state) < 1e-12


def test_the_path_table():
    assert choose_path("token", 1, writes=False, padded=False) is ComputePath.READ
    assert choose_path("segment", 100, writes=False, padded=True) is ComputePath.READ
    assert choose_path("segment", 1, writes=True, padded=False) is ComputePath.SEGMENT
    assert choose_path("token", 1, writes=True, padded=False) is ComputePath.STEP
    assert choose_path("multi", 1, writes=True, padded=False, cpu_kernel=True) is ComputePath.FUSED_CPU
    assert choose_path("token", 1, writes=True, padded=True) is ComputePath.RECURRENT
    assert choose_path("token", RECURRENT_MAX_TOKENS, writes=True, padded=False) is ComputePath.RECURRENT
    assert choose_path("token", RECURRENT_MAX_TOKENS + 1, writes=True, padded=False) is ComputePath.CHUNKED
    assert choose_path("token", 512, True, False, cuda=False, gpu_kernel=True) is ComputePath.CHUNKED
    assert choose_path("token", 512, True, False, cuda=True, gpu_kernel=True) is ComputePath.GPU_PLUGIN
    memory = layer()
    x, state, _, _ = inputs(memory, 1, 1, padded=False)
    assert memory.path_for(x, state, True, None) is ComputePath.STEP  # float64: the float32 CPU kernel never runs
    assert choose_path("token", 1, writes=False, padded=False, cpu_kernel=True) is ComputePath.READ_FUSED_CPU
    assert choose_path("token", 1, writes=False, padded=True, cpu_kernel=True) is ComputePath.READ
    assert choose_path("token", 2, writes=False, padded=False, cpu_kernel=True) is ComputePath.READ


@pytest.mark.parametrize("forget_gate", ["tied", "separate"])
def test_gates_are_the_projection_gates(forget_gate):
    memory = layer("multi", forget_gate)
    x = torch.randn(2, 5, SHAPES.hidden, dtype=torch.float64)
    beta, lam = memory.gates(x)
    _, _, _, ref_beta, ref_lam = memory.project(x)
    assert beta.shape == (2, 5, 3, 4) and rel_err(beta, ref_beta) < 1e-13
    assert rel_err(lam, 1 - ref_beta if ref_lam is None else ref_lam) < 1e-13
    beta.sum().backward()
    assert memory.beta_proj.grad is not None and memory.beta_bias.grad is not None


def test_decoder_of_and_attention_modules():
    from tiny_models import tiny_model

    from deltamem_agents.core.attach import attention_modules, decoder_of

    for family in ("llama", "gpt2"):
        model = tiny_model(family)
        assert decoder_of(model) is (model.transformer if family == "gpt2" else model.model)  # before attaching too
        attach_memory(model, DeltaMemConfig(layers=(1,) if family == "gpt2" else None))
        modules = attention_modules(model)
        assert [m.deltamem for m in modules] == model._deltamem_attachment.modules
        blocks = model.transformer.h if family == "gpt2" else model.model.layers
        expected = [blocks[1].attn] if family == "gpt2" else [b.self_attn for b in blocks]
        assert modules == expected


def test_cache_from_states_keeps_autograd_and_reads_like_a_written_cache():
    from tiny_models import randomize_memory, tiny_model

    from deltamem_agents.core.attach import decoder_of
    from deltamem_agents.core.cache import DeltaMemCache
    from deltamem_agents.core.errors import DeltaMemError

    model = attach_memory(tiny_model("llama"), DeltaMemConfig())
    randomize_memory(model)
    history, question = torch.arange(3, 30)[None], torch.arange(40, 50)[None]
    written = new_cache(model, writes=True)
    decoder_of(model)(input_ids=history, cache=written, use_cache=True)  # a write pass, with autograd
    states = written.carrier.states
    assert all(s.requires_grad for s in states)
    live = DeltaMemCache.from_states(model, states, writes=False)
    logits = model(question, cache=live).logits
    with torch.no_grad():  # the same read through a cache restored from the detached state
        expected = model(question, cache=new_cache(model, written.memory_state(), writes=False)).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    logits.square().mean().backward()  # the read's loss reaches the write's parameters through the live states
    assert model.model.layers[0].self_attn.deltamem.memory_k_proj.grad.abs().sum() > 0
    with pytest.raises(DeltaMemError, match="states for"):
        DeltaMemCache.from_states(model, states[:1])
    with pytest.raises(DeltaMemError, match="must be"):
        DeltaMemCache.from_states(model, [s[:, :, :2] for s in states])


def test_cpu_decode_source_is_a_package_file():
    from deltamem_agents.core.ops import cpu_decode

    assert cpu_decode.SOURCE.name == "cpu_decode.cpp" and "decode_step" in cpu_decode.SOURCE.read_text()


def test_read_operator_cache_follows_the_state():
    memory = layer("multi")
    x, state, _, _ = inputs(memory, 2, 3, padded=False)
    with torch.no_grad():
        first = memory(x, state, False)[0]["q"].clone()
        assert memory.read_operator(state) is memory.read_operator(state)  # cached for this state object
        state.mul_(2.0)  # an in-place change (version bump) must rebuild it
        assert torch.allclose(memory(x, state, False)[0]["q"], 2 * first)
        other = state.clone()  # another state object: rebuilt, same values
        assert torch.allclose(memory(x, other, False)[0]["q"], 2 * first)
        memory.delta_q_proj.mul_(0.5)  # a weight update rebuilds the packed weights and the operator
        assert torch.allclose(memory(x, other, False)[0]["q"], first)


@pytest.mark.parametrize("grad", [False, True])
def test_corrections_add_to_equals_output_plus_correction(grad):
    memory = layer("multi")
    x, state, _, _ = inputs(memory, 2, 4, padded=False)
    one = state[:1]  # one state read by a batch of two (broadcast), and one state per example
    with torch.set_grad_enabled(grad):
        for writes, s in ((False, one), (False, state), (True, state)):
            corrections, _ = memory(x, s, writes)
            reference, _ = memory.forward_reference(x, s.expand(2, -1, -1, -1), writes)
            output = torch.randn(2, 4, SHAPES.q_out, dtype=torch.float64)
            expected = output + reference["q"]
            assert rel_err(corrections.add_to("q", output.clone()), expected) < 1e-12
            assert rel_err(corrections["q"], reference["q"]) < 1e-12
