"""fla_scan: the δ-mem scan contract of ``delta_scan_chunked``, run by fla's Triton GDN kernel on CUDA."""

import torch

from deltamem_fla.mapping import from_gdn_state, reads_from_gdn, to_gdn


def fla_scan(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    **_ignored,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``deltamem_agents.core.ops.delta_scan_recurrent``; CUDA tensors only.

    Computes in float32 (the inputs are cast); returns ``(final_state (B, H, r, r), reads (B, T, H, r))``.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    if not q.is_cuda:
        raise ValueError("fla_scan runs on CUDA tensors only; use deltamem_agents.core.ops.delta_scan_chunked on CPU")
    heads, rank = q.shape[2], q.shape[3]
    tensors = [t.float() if t is not None else None for t in (state, q, k, v, beta, lam)]
    state, q, k, v, beta, lam = tensors
    gdn = to_gdn(state, q, k, v, beta, mask=mask, lam=lam)
    output, final = chunk_gated_delta_rule(
        gdn["q"],
        gdn["k"],
        gdn["v"],
        g=gdn["g"],
        beta=gdn["beta"],
        scale=1.0,
        initial_state=gdn["initial_state"],
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )  # (B, 2T, H*r, 1), (B, H*r, r, 1)
    return from_gdn_state(final, heads, rank), reads_from_gdn(output, heads, rank)
