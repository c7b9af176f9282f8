"""The GDN mapping reproduces the δ-mem token loop, checked with a pure-torch GDN recurrence (no GPU needed)."""

import pytest
import torch
import torch.nn.functional as F
from deltamem_fla.mapping import from_gdn_state, reads_from_gdn, to_gdn

from deltamem_agents.core.ops import delta_scan_recurrent


def naive_gdn(q, k, v, g, beta, initial_state):
    """fla's recurrence: S = exp(g) S + beta (v - exp(g) S^T k) k^T in [K, V] layout, o = S^T q after the update."""
    s = initial_state.clone()  # (B, N, K, V)
    outputs = []
    for t in range(q.shape[1]):
        s = s * g[:, t, :, None, None].exp()
        error = v[:, t] - torch.einsum("bnkv,bnk->bnv", s, k[:, t])  # (B, N, V)
        s = s + beta[:, t, :, None, None] * k[:, t, :, :, None] * error[:, :, None, :]
        outputs.append(torch.einsum("bnkv,bnk->bnv", s, q[:, t]))
    return torch.stack(outputs, 1), s


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_mapping_equals_the_token_loop(heads, separate, padded):
    g = torch.Generator().manual_seed(heads)
    shape = (2, 13, heads, 8)
    q = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(shape, generator=g, dtype=torch.float64))
    lam = torch.sigmoid(torch.randn(shape, generator=g, dtype=torch.float64) + 2) if separate else None
    state = torch.randn(2, heads, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 13, generator=g) > 0.3 if padded else None
    ref_state, ref_reads = delta_scan_recurrent(state, q, k, v, beta, mask=mask, lam=lam)
    gdn = to_gdn(state, q, k, v, beta, mask=mask, lam=lam)
    out, final = naive_gdn(gdn["q"], gdn["k"], gdn["v"], gdn["g"], gdn["beta"], gdn["initial_state"])
    assert torch.allclose(from_gdn_state(final, heads, 8), ref_state, atol=1e-10)
    assert torch.allclose(reads_from_gdn(out, heads, 8), ref_reads, atol=1e-10)
