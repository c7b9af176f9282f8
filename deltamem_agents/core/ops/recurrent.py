"""The reference δ-mem scan: a plain token loop, written to read like METHOD.md's equations.

It is slow (one Python step per token) and exists to be obviously right; every fast path is tested against it.
"""

import torch

from deltamem_agents.core.ops.validation import check_scan_inputs, compute_dtype


def delta_scan_recurrent(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule token by token.

    Args:
        state: ``(B, H, r, r)`` state before the first token; rows are value/read dims, columns key dims.
        q, k: ``(B, T, H, r)`` read query and write key (already L2-normalised by the caller).
        v: ``(B, T, H, r)`` value to write.
        beta: ``(B, T, H, r)`` write gate in (0, 1), one per state row.
        mask: optional ``(B, T)``; where false the token neither reads (read = 0) nor writes.
        lam: optional ``(B, T, H, r)`` forget gate; defaults to ``1 - beta`` (the paper's tied gate).

    Returns:
        ``(final_state, reads)``: ``(B, H, r, r)`` and ``(B, T, H, r)``, where ``reads[:, t]`` is taken from the
        state BEFORE token t is written. Both in the accumulation dtype (float32, or float64 for float64 input).
    """
    check_scan_inputs(state, q, k, v, beta, mask, lam)
    dtype = compute_dtype(state, q)
    s = state.to(dtype)  # (B, H, r, r)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    lam = (1.0 - beta) if lam is None else lam.to(dtype)
    reads = []
    for t in range(q.shape[1]):
        read = torch.einsum("bhij,bhj->bhi", s, q[:, t])  # (B, H, r)   read first, no 1/sqrt(r)
        recalled = torch.einsum("bhij,bhj->bhi", s, k[:, t])  # (B, H, r)
        error = beta[:, t] * (v[:, t] - recalled)  # (B, H, r)   erase uses beta, not lam*beta
        written = lam[:, t, :, :, None] * s + error[..., None] * k[:, t, :, None, :]  # (B, H, r, r)
        if mask is not None:
            keep = mask[:, t].to(torch.bool)  # (B,)
            written = torch.where(keep[:, None, None, None], written, s)
            read = read * keep[:, None, None].to(dtype)
        s = written
        reads.append(read)
    return s, torch.stack(reads, dim=1)  # (B, H, r, r), (B, T, H, r)
