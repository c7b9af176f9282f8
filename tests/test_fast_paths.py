"""Every fast path of the memory layer equals the plain reference beside it (float64, tight tolerances)."""

import pytest
import torch
from tiny_models import LAYER_SHAPES as SHAPES
from tiny_models import memory_layer as layer
from tiny_models import rel_err

from deltamem_agents import DeltaMemConfig
from deltamem_agents.core.ops import delta_scan_recurrent, delta_step


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("separate", [False, True])
def test_delta_step_equals_one_recurrent_step(heads, separate):
    g = torch.Generator().manual_seed(heads)
    q, k = (
        torch.nn.functional.normalize(torch.randn(2, 1, heads, 8, generator=g, dtype=torch.float64), dim=-1)
        for _ in "qk"
    )
    v = torch.randn(2, 1, heads, 8, generator=g, dtype=torch.float64)
    beta = torch.rand(2, 1, heads, 8, generator=g, dtype=torch.float64)
    lam = torch.rand(2, 1, heads, 8, generator=g, dtype=torch.float64) if separate else None
    state = torch.randn(2, heads, 8, 8, generator=g, dtype=torch.float64)
    ref_state, ref_reads = delta_scan_recurrent(state, q, k, v, beta, lam=lam)
    got_state, got_read = delta_step(state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], lam[:, 0] if separate else None)
    assert rel_err(got_state, ref_state) < 1e-13
    assert rel_err(got_read, ref_reads[:, 0]) < 1e-13


@pytest.mark.parametrize("write", ["token", "multi"])
@pytest.mark.parametrize("forget_gate", ["tied", "separate"])
@pytest.mark.parametrize("grad", [False, True])
def test_packed_projection_equals_the_reference(write, forget_gate, grad):
    memory = layer(write, forget_gate)
    x = torch.randn(2, 5, SHAPES.hidden, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        got, ref = memory.project(x), memory.project_reference(x)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and rel_err(a, b) < 1e-13
    query = memory.project_query(x)
    assert rel_err(query, ref[0]) < 1e-13
    if grad:  # gradients reach every projection through the packed weight
        sum(t.sum() for t in got if t is not None).backward()
        assert memory.memory_k_proj.grad is not None and memory.beta_bias.grad is not None


@pytest.mark.parametrize("write", ["token", "multi"])
@pytest.mark.parametrize("forget_gate", ["tied", "separate"])
def test_decode_step_equals_the_token_loop(write, forget_gate):
    memory = layer(write, forget_gate)
    h, r = memory.config.num_heads, memory.config.rank
    x = torch.randn(3, 1, SHAPES.hidden, dtype=torch.float64)
    state = torch.randn(3, h, r, r, dtype=torch.float64)
    with torch.no_grad():
        reads, new_state = memory.read_write(x, state, writes=True)  # the fast path for one token
        q, k, v, beta, lam = memory.project_reference(x)
        ref_state, ref_reads = delta_scan_recurrent(state, q, k, v, beta, lam=lam)
    assert rel_err(new_state, ref_state) < 1e-13
    assert rel_err(reads, ref_reads.reshape(3, 1, -1)) < 1e-13


@pytest.mark.parametrize("grad", [False, True])
def test_packed_corrections_equal_each_correction(grad):
    memory = layer()
    reads = torch.randn(2, 3, memory.config.read_dim, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        got = memory.corrections(reads)
        assert set(got) == {"q", "o"}
        for name, delta in got.items():
            assert rel_err(delta, memory.correction(name, reads)) < 1e-13
        if grad:
            sum(d.sum() for d in got.values()).backward()
            assert memory.delta_q_proj.grad is not None and memory.delta_o_proj.grad is not None


def test_packed_weights_are_cached_under_no_grad_and_follow_weight_updates():
    memory = layer()
    reads = torch.randn(2, 3, memory.config.read_dim, dtype=torch.float64)
    x = torch.randn(1, 2, SHAPES.hidden, dtype=torch.float64)
    with torch.no_grad():
        assert memory.packed_weights() is memory.packed_weights()  # one build while nothing changes
        before = memory.corrections(reads)["q"].clone()
        memory.delta_q_proj.mul_(3.0)  # an in-place update (an optimizer step) must invalidate the cache
        memory.memory_q_proj.add_(1.0)
        after = memory.corrections(reads)["q"]
        assert rel_err(after, memory.correction("q", reads)) < 1e-13
        assert not torch.allclose(before, after)
        assert rel_err(memory.project(x)[0], memory.project_reference(x)[0]) < 1e-13
    with torch.enable_grad():  # with autograd the packed weights are built from the parameters per call
        assert memory.packed_weights().projection.requires_grad


@pytest.fixture
def cpu_kernel():
    from deltamem_agents.core.ops import cpu_decode

    if not cpu_decode.enable_cpu_decode_kernel(True):
        pytest.skip("the fused CPU decode kernel cannot be built here (no C++ compiler or ninja)")
    yield
    cpu_decode.enable_cpu_decode_kernel(False)


@pytest.mark.parametrize("write", ["token", "multi"])
@pytest.mark.parametrize("forget_gate", ["tied", "separate"])
def test_fused_cpu_decode_kernel_equals_the_token_loop(cpu_kernel, write, forget_gate):
    memory = layer(write, forget_gate).float()
    h, r = memory.config.num_heads, memory.config.rank
    x = torch.randn(3, 1, SHAPES.hidden)
    state = torch.randn(3, h, r, r)
    with torch.no_grad():
        assert memory.path_for(x, state, True, None).value == "fused_cpu"
        deltas, new_state = memory(x, state, True)
        q, k, v, beta, lam = memory.project_reference(x)
        ref_state, ref_reads = delta_scan_recurrent(state, q, k, v, beta, lam=lam)
        for name in memory.corrected:
            assert rel_err(deltas[name], memory.correction(name, ref_reads.reshape(3, 1, -1))) < 1e-5
    assert rel_err(new_state, ref_state) < 1e-5
    with torch.enable_grad():  # never under autograd: the kernel has no backward
        assert memory.path_for(x, state, True, None).value == "step"


def test_fused_kernel_in_a_model_matches_pure_torch_decoding(cpu_kernel):
    from tiny_models import randomize_memory, tiny_model

    from deltamem_agents import attach_memory, new_cache
    from deltamem_agents.core.ops import cpu_decode

    model = attach_memory(tiny_model("llama"), DeltaMemConfig())
    randomize_memory(model)
    prompt = torch.arange(3, 20)[None]
    runs = {}
    for enabled in (False, True):
        cpu_decode.enable_cpu_decode_kernel(enabled)
        cache, logits = new_cache(model), []
        with torch.no_grad():
            token = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
            for _ in range(6):
                out = model(token, cache=cache).logits
                logits.append(out)
                token = out[:, -1:].argmax(-1)
        runs[enabled] = torch.cat(logits, 1), cache.memory_state().tensor
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-6, rtol=1e-4)
