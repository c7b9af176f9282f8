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
    """The CPU decode kernel, built (scripts/setup.sh has normally built it already; a build takes ~1 s) and on."""
    from deltamem_agents.core.ops import cpu_decode

    try:
        cpu_decode.build()
    except RuntimeError as err:
        pytest.skip(f"the CPU decode kernel cannot be built here: {err}")
    cpu_decode.reload()
    previous = cpu_decode._enabled
    assert cpu_decode.enable_cpu_decode_kernel(True)
    yield cpu_decode
    cpu_decode.enable_cpu_decode_kernel(previous)


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


@pytest.mark.parametrize("write", ["token", "multi", "segment"])
@pytest.mark.parametrize("corrections", ["qo", "qkvo"])
@pytest.mark.parametrize("state_batch", [1, 3])
def test_fused_cpu_read_kernel_equals_the_reference_read(cpu_kernel, write, corrections, state_batch):
    memory = layer(write, corrections=corrections).float()
    h, r = memory.config.num_heads, memory.config.rank
    x = torch.randn(3, 1, SHAPES.hidden)
    state = torch.randn(state_batch, h, r, r)  # a batch-1 state is read by every example
    with torch.no_grad():
        assert memory.path_for(x, state, False, None).value == "read_fused_cpu"
        deltas, new_state = memory(x, state, False)
        ref, _ = memory.forward_reference(x, state.expand(3, -1, -1, -1), False)
        outputs = {name: torch.randn(3, 1, ref[name].shape[-1]) for name in ref}
        for name in memory.corrected:
            assert rel_err(deltas[name], ref[name]) < 1e-5
            expected = outputs[name] + ref[name]
            assert rel_err(deltas.add_to(name, outputs[name].clone()), expected) < 1e-5
    assert new_state is state  # writes off: the state is untouched
    assert memory.path_for(x, state, False, torch.ones(3, 1, dtype=torch.bool)).value == "read"  # padded: torch
    assert memory.path_for(x.double(), state.double(), False, None).value == "read"  # float64: torch


@pytest.mark.parametrize(
    "options, writes, batch",
    [
        ({}, True, 1),
        ({}, False, 1),
        ({}, False, 2),  # a batch-1 state read by two examples
        ({"write": "multi", "corrections": "qkvo"}, True, 2),
        ({"write": "multi", "forget_gate": "separate"}, False, 1),
        ({"write": "segment"}, False, 1),
    ],
)
def test_fused_kernel_in_a_model_matches_pure_torch_decoding(cpu_kernel, monkeypatch, options, writes, batch):
    """Decoding through the decode plan (core.decode_plan: the kernel, bookkeeping once per call) equals pure
    torch: logits of every token and the final states."""
    from tiny_models import randomize_memory, tiny_model

    from deltamem_agents import attach_memory, new_cache
    from deltamem_agents.core import attach

    plans = []
    plan_for = attach.plan_for
    monkeypatch.setattr(attach, "plan_for", lambda *a: plans.append(plan_for(*a)) or plans[-1])
    model = attach_memory(tiny_model("llama"), DeltaMemConfig(**options))
    randomize_memory(model)
    prompt = torch.stack([torch.arange(3, 20) + i for i in range(batch)])  # (batch, 17)
    runs = {}
    for enabled in (False, True):
        cpu_kernel.enable_cpu_decode_kernel(enabled)
        plans.clear()
        cache, logits = new_cache(model), []
        with torch.no_grad():
            model(prompt, cache=cache)  # a written state
            cache.memory_writes = writes  # writes off: the chat's decode
            token = torch.arange(5, 5 + batch)[:, None]
            if not writes and batch > 1:  # one conversation's state read by every example
                cache.carrier.states = [s[:1] for s in cache.carrier.states]
            for _ in range(6):
                out = model(token, cache=cache).logits
                logits.append(out)
                token = out[:, -1:].argmax(-1)
        runs[enabled] = torch.cat(logits, 1), torch.stack(cache.carrier.states)
        assert sum(p is not None for p in plans) == (6 if enabled else 0)  # every decoding token, with the kernel
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-6, rtol=1e-4)


def test_decode_plan_skips_empty_layers_and_refuses_what_it_does_not_fit(cpu_kernel):
    from deltamem_agents.core.carrier import MemoryCarrier
    from deltamem_agents.core.decode_plan import plan_for

    modules = [layer().float(), layer().float()]
    carrier = MemoryCarrier(states=[None, torch.randn(1, 1, 4, 4)], writes=False)
    with torch.no_grad():
        plan = plan_for(modules, carrier, 1, 1, False, torch.float32)
        assert plan.steps[0] is None and plan.steps[1] is not None  # an empty state with writes off reads 0
        assert plan_for(modules, carrier, 1, 2, False, torch.float32) is None  # two tokens
        assert plan_for(modules, carrier, 1, 1, True, torch.float32) is None  # padding
        assert plan_for(modules, carrier, 1, 1, False, torch.bfloat16) is None  # a bf16 backbone
        assert plan_for(modules, carrier, 3, 1, False, torch.float32) is not None  # batch-1 state read by 3
        carrier.states[1] = torch.randn(2, 1, 4, 4)
        assert plan_for(modules, carrier, 3, 1, False, torch.float32) is None  # a state of another batch
    assert plan_for(modules, carrier, 1, 1, False, torch.float32) is None  # autograd on


def test_cpu_kernel_is_on_when_built_and_off_with_the_switch(cpu_kernel, monkeypatch):
    import importlib

    try:
        for value, expected in ((None, True), ("1", True), ("0", False)):
            if value is None:
                monkeypatch.delenv("DELTAMEM_CPU_KERNEL", raising=False)
            else:
                monkeypatch.setenv("DELTAMEM_CPU_KERNEL", value)
            importlib.reload(cpu_kernel)  # the switch is read at import
            assert (cpu_kernel.kernel() is not None) is expected
    finally:
        monkeypatch.delenv("DELTAMEM_CPU_KERNEL", raising=False)
        importlib.reload(cpu_kernel)
        cpu_kernel.enable_cpu_decode_kernel(True)


def test_without_a_built_kernel_decoding_is_pure_torch_and_nothing_compiles(cpu_kernel, monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("DELTAMEM_KERNEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the run time must never compile"))
    cpu_kernel.reload()
    try:
        assert cpu_kernel.kernel() is None and not cpu_kernel.enable_cpu_decode_kernel(True)
        memory = layer().float()
        x, state = torch.randn(2, 1, SHAPES.hidden), torch.randn(2, 1, 4, 4)
        with torch.no_grad():
            assert memory.path_for(x, state, True, None).value == "step"
            assert memory.path_for(x, state, False, None).value == "read"
        # a file under the kernel's name that is not the kernel is refused with a warning, never used
        cpu_kernel.library_path().parent.mkdir(parents=True)
        cpu_kernel.library_path().write_bytes(b"not a shared library")
        cpu_kernel.reload()
        with pytest.warns(UserWarning, match="refused, using pure torch"):
            assert cpu_kernel.kernel() is None
    finally:
        monkeypatch.undo()
        cpu_kernel.reload()
