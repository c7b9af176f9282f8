"""fla_scan on CUDA equals the δ-mem token loop (outputs, final state, gradients). Skipped without CUDA + fla."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from deltamem_agents.core.ops import delta_scan_recurrent

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
    reason="needs a CUDA GPU and flash-linear-attention",
)


@pytest.mark.parametrize("length", [1, 63, 75, 300])
@pytest.mark.parametrize("heads", [1, 4])
def test_fla_scan_matches_the_token_loop(length, heads):
    from deltamem_fla import fla_scan

    g = torch.Generator().manual_seed(length)
    shape = (2, length, heads, 8)
    inputs = [
        torch.randn(2, heads, 8, 8, generator=g),
        F.normalize(torch.randn(shape, generator=g), dim=-1),
        F.normalize(torch.randn(shape, generator=g), dim=-1),
        torch.randn(shape, generator=g),
        torch.sigmoid(torch.randn(shape, generator=g) - 1.0),
    ]
    cpu = [t.double().requires_grad_(True) for t in inputs]
    gpu = [t.cuda().requires_grad_(True) for t in inputs]
    ref_state, ref_reads = delta_scan_recurrent(*cpu)
    got_state, got_reads = fla_scan(*gpu)
    assert torch.allclose(got_state.cpu().double(), ref_state, atol=2e-3, rtol=2e-3)
    assert torch.allclose(got_reads.cpu().double(), ref_reads, atol=2e-3, rtol=2e-3)
    (ref_state.sum() + ref_reads.sum()).backward()
    (got_state.sum() + got_reads.sum()).backward()
    for ref, got in zip(cpu, gpu):
        assert torch.allclose(got.grad.cpu().double(), ref.grad, atol=5e-3, rtol=5e-3)
