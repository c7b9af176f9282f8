"""One δ-mem token step without Python loops or masks: the decode fast path.

Same equations as one iteration of :func:`delta_scan_recurrent` (the reference it is tested against), written
with one batched matmul for the read and the recall and one fused multiply-add for the write.
"""

import torch


def delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    lam: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read then write one token.

    Args:
        state: ``(B, H, r, r)`` float32 or float64 state before the token.
        q, k, v, beta, lam: ``(B, H, r)`` in the state's dtype; ``lam`` defaults to ``1 - beta``.

    Returns:
        ``(new_state, read)``: ``(B, H, r, r)`` and ``(B, H, r)``; the read comes from the state BEFORE the write.
    """
    both = state @ torch.stack([q, k], dim=-1)  # (B, H, r, 2)   S q and S k in one matmul
    read, recalled = both[..., 0], both[..., 1]  # (B, H, r)
    error = beta * (v - recalled)  # (B, H, r)   erase uses beta, not lam * beta
    if lam is None:  # tied gate: lam * S = S - beta * S, one op
        decayed = torch.addcmul(state, beta[..., None], state, value=-1.0)  # (B, H, r, r)
    else:
        decayed = lam[..., None] * state  # (B, H, r, r)
    new_state = torch.addcmul(decayed, error[..., None], k[..., None, :])  # (B, H, r, r)
    return new_state, read
