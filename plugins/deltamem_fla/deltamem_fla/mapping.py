"""METHOD.md's mapping from one δ-mem scan to Gated DeltaNet (GDN) inputs, in plain torch (no fla needed).

GDN: S_t = a_t S_{t-1} + b_t (v_t - a_t S_{t-1} k_t) k_t^T, output o_t = S_t q_t (after the update), scalar gates
per head. δ-mem row i of an r x r state: s_t = lam_i s + beta_i (v_i - s.k) k^T, read BEFORE the update.
With a = lam, b = beta / lam, v' = lam v the GDN row equals the δ-mem row; a no-op step (b = 0, g = 0, v = 0)
before each write step, carrying the query, gives the pre-update read.
"""

import torch

# lambda is floored so that beta / lambda stays finite (lambda = 0 happens only at saturated fp32 gates).
LAMBDA_FLOOR = 1e-12


def to_gdn(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """GDN inputs for the δ-mem scan ``(state, q, k, v, beta, mask, lam)`` (shapes as ``delta_scan_recurrent``).

    Returns a dict with ``q, k`` ``(B, 2T, H*r, r)``, ``v`` ``(B, 2T, H*r, 1)``, ``g, beta`` ``(B, 2T, H*r)`` and
    ``initial_state`` ``(B, H*r, r, 1)`` (fla's [K, V] layout: row i of state head h as a key-sized column).
    Even steps are the no-op reads, odd steps the writes.
    """
    batch, length, heads, rank = q.shape
    lam = (1.0 - beta) if lam is None else lam
    if mask is not None:
        keep = mask.to(q.dtype)[:, :, None, None]  # (B, T, 1, 1)
        beta, q = beta * keep, q * keep  # masked: no write, read 0 ...
        lam = lam * keep + (1.0 - keep)  # ... and no forgetting
    lam = lam.clamp_min(LAMBDA_FLOOR)
    rows = heads * rank  # one GDN head per state row

    def per_row(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, r) shared by the r rows -> (B, T, H*r, r)
        return x[:, :, :, None, :].expand(batch, length, heads, rank, rank).reshape(batch, length, rows, rank)

    def interleave(read: torch.Tensor, write: torch.Tensor) -> torch.Tensor:  # two (B, T, ...) -> (B, 2T, ...)
        return torch.stack([read, write], dim=2).reshape(batch, 2 * length, *read.shape[2:])

    q_rows, k_rows = per_row(q), per_row(k)  # (B, T, H*r, r)
    lam_rows, beta_rows = lam.reshape(batch, length, rows), beta.reshape(batch, length, rows)  # (B, T, H*r)
    zeros = torch.zeros_like(lam_rows)
    return {
        "q": interleave(q_rows, torch.zeros_like(q_rows)),
        "k": interleave(k_rows, k_rows),  # b = 0 on the no-op step, so its key does nothing
        "v": interleave(zeros, lam_rows * v.reshape(batch, length, rows))[..., None],
        "g": interleave(zeros, torch.log(lam_rows)),
        "beta": interleave(zeros, beta_rows / lam_rows),
        "initial_state": state.reshape(batch, rows, rank)[..., None],  # (B, H*r, r, 1)
    }


def from_gdn_state(final_state: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """fla's final state ``(B, H*r, r, 1)`` back to δ-mem's ``(B, H, r, r)``."""
    return final_state[..., 0].reshape(final_state.shape[0], heads, rank, rank)


def reads_from_gdn(output: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """GDN outputs ``(B, 2T, H*r, 1)`` -> δ-mem reads ``(B, T, H, r)`` (the no-op steps)."""
    batch = output.shape[0]
    return output[:, 0::2, :, 0].reshape(batch, -1, heads, rank)
