"""The chunked scan equals the reference token loop: outputs, final state and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from deltamem_agents.core.ops import delta_scan_chunked, delta_scan_recurrent


def scan_inputs(batch, length, heads, rank=8, seed=0, separate=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = F.normalize(rand(batch, length, heads, rank), dim=-1)
    k = F.normalize(rand(batch, length, heads, rank), dim=-1)
    v = rand(batch, length, heads, rank)
    beta = torch.sigmoid(rand(batch, length, heads, rank))
    lam = torch.sigmoid(rand(batch, length, heads, rank) + 2.0) if separate else None
    state = rand(batch, heads, rank, rank)
    return state, q, k, v, beta, lam


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("length", [1, 7, 63, 75, 300])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_matches_recurrent_outputs_and_gradients(length, heads, separate, padded):
    state, q, k, v, beta, lam = scan_inputs(2, length, heads, separate=separate, seed=length + heads)
    mask = (torch.rand(2, length, generator=torch.Generator().manual_seed(3)) > 0.25) if padded else None
    inputs = [t.clone().requires_grad_(True) for t in (state, q, k, v, beta) + ((lam,) if separate else ())]
    twins = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run(fn, tensors, **kw):
        s, qq, kk, vv, bb = tensors[:5]
        return fn(s, qq, kk, vv, bb, mask=mask, lam=tensors[5] if separate else None, **kw)

    ref_state, ref_reads = run(delta_scan_recurrent, inputs)
    got_state, got_reads = run(delta_scan_chunked, twins, chunk_size=16)
    assert rel_err(got_reads, ref_reads) < 1e-10
    assert rel_err(got_state, ref_state) < 1e-10
    weights = torch.randn_like(ref_reads), torch.randn_like(ref_state)
    ((ref_reads * weights[0]).sum() + (ref_state * weights[1]).sum()).backward()
    ((got_reads * weights[0]).sum() + (got_state * weights[1]).sum()).backward()
    for name, ref, got in zip(["state", "q", "k", "v", "beta", "lam"], inputs, twins):
        assert rel_err(got.grad, ref.grad) < 1e-8, name


def test_reads_come_before_the_write_and_padding_is_inert():
    state, q, k, v, beta, _ = scan_inputs(1, 5, 1, separate=False)
    zero = torch.zeros_like(state)
    _, reads = delta_scan_recurrent(zero, q, k, v, beta)
    assert torch.equal(reads[:, 0], torch.zeros_like(reads[:, 0]))  # first token reads S_0 = 0
    assert reads[:, 1].abs().sum() > 0
    mask = torch.tensor([[True, False, True, True, True]])
    s_masked, r_masked = delta_scan_chunked(state, q, k, v, beta, mask=mask)
    keep = torch.tensor([0, 2, 3, 4])
    s_dropped, r_dropped = delta_scan_recurrent(state, q[:, keep], k[:, keep], v[:, keep], beta[:, keep])
    assert torch.allclose(s_masked, s_dropped, atol=1e-12)
    assert torch.equal(r_masked[:, 1], torch.zeros_like(r_masked[:, 1]))
    assert torch.allclose(r_masked[:, keep], r_dropped, atol=1e-12)


@pytest.mark.parametrize("fn", [delta_scan_recurrent, delta_scan_chunked])
def test_two_chained_calls_equal_one_call(fn):
    state, q, k, v, beta, lam = scan_inputs(2, 90, 4)
    whole_state, whole_reads = fn(state, q, k, v, beta, lam=lam)
    mid_state, first = fn(state, q[:, :37], k[:, :37], v[:, :37], beta[:, :37], lam=lam[:, :37])
    end_state, second = fn(mid_state, q[:, 37:], k[:, 37:], v[:, 37:], beta[:, 37:], lam=lam[:, 37:])
    assert rel_err(end_state, whole_state) < 1e-10
    assert rel_err(torch.cat([first, second], 1), whole_reads) < 1e-10


def test_accumulation_dtype_and_saturated_gates():
    state, q, k, v, beta, _ = scan_inputs(1, 40, 1, dtype=torch.float32)
    half = [t.to(torch.bfloat16) for t in (state, q, k, v, beta)]
    s, r = delta_scan_chunked(*half)
    assert s.dtype == torch.float32 and r.dtype == torch.float32
    ones = torch.ones_like(beta)  # beta = 1 -> lambda = 0: log floor keeps everything finite
    s_c, r_c = delta_scan_chunked(state, q, k, v, ones)
    s_r, r_r = delta_scan_recurrent(state, q, k, v, ones)
    assert torch.isfinite(s_c).all() and torch.allclose(s_c, s_r, atol=1e-5)
    assert torch.allclose(r_c, r_r, atol=1e-5)


def test_bad_shapes_name_the_argument():
    state, q, k, v, beta, _ = scan_inputs(1, 4, 1)
    with pytest.raises(ValueError, match="beta"):
        delta_scan_chunked(state, q, k, v, beta[:, :3])
    with pytest.raises(ValueError, match="state"):
        delta_scan_recurrent(state[:, :, :4], q, k, v, beta)
