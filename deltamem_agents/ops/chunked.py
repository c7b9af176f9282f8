"""The exact chunk-parallel δ-mem scan (the WY / UT form of METHOD.md), for prefill and training.

Each state row i is an independent scalar delta rule with its own gates, sharing q and k. Inside a chunk of C
tokens the unknown write strengths u solve a unit-lower-triangular system; the end-of-chunk state is an affine
map of the start state (s_end = M s0 + b), so only that r x r map is iterated chunk by chunk, and all reads are
computed in parallel afterwards. Exponents are masked before exp, so every exp argument is <= 0.
"""

import torch
import torch.nn.functional as F

from deltamem_agents.ops.validation import check_scan_inputs, compute_dtype

# log(lambda) is floored so that lambda == 0 (beta == 1 in fp32) cannot produce -inf - (-inf) = NaN.
LOG_LAMBDA_FLOOR = -80.0


def delta_scan_chunked(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`delta_scan_recurrent`, computed chunk-parallel (exact up to float rounding)."""
    check_scan_inputs(state, q, k, v, beta, mask, lam)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype(state, q)
    batch, length, heads, rank = q.shape
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    lam = (1.0 - beta) if lam is None else lam.to(dtype)
    log_lam = torch.log(lam).clamp_min(LOG_LAMBDA_FLOOR)  # (B, T, H, r)
    if mask is not None:
        keep = mask.to(dtype)[:, :, None, None]  # (B, T, 1, 1)
        beta = beta * keep  # masked tokens write nothing ...
        log_lam = log_lam * keep  # ... and forget nothing
    c = min(chunk_size, max(length, 1))
    pad = (-length) % c
    if pad:  # padded steps are no-ops: beta = 0, lambda = 1, q = k = v = 0
        q, k, v, beta, log_lam = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, beta, log_lam))
    n = (length + pad) // c

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, n, c, heads, rank).permute(0, 3, 1, 2, 4)  # (B, H, N, C, r)

    qc, kc = chunks(q), chunks(k)  # (B, H, N, C, r)
    beta_rows = chunks(beta).transpose(-1, -2)  # (B, H, N, r, C)   gates act per state row
    v_rows = chunks(v).transpose(-1, -2)  # (B, H, N, r, C)
    cum = chunks(log_lam).transpose(-1, -2).cumsum(-1)  # (B, H, N, r, C)   P, inclusive
    cum_excl = cum - chunks(log_lam).transpose(-1, -2)  # (B, H, N, r, C)   P-, exclusive

    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)  # (C, C) [t, j], j < t
    exponent = cum_excl[..., :, None] - cum[..., None, :]  # (B, H, N, r, C, C)
    decay = torch.exp(exponent.masked_fill(~strictly_lower, float("-inf")))  # (B, H, N, r, C, C)
    kk = kc @ kc.transpose(-1, -2)  # (B, H, N, C, C)
    qk = qc @ kc.transpose(-1, -2)  # (B, H, N, C, C)

    eye_c = torch.eye(c, dtype=dtype, device=q.device)
    system = eye_c + beta_rows[..., :, None] * decay * kk[:, :, :, None]  # (B, H, N, r, C, C)  I + A
    rhs_v = (beta_rows * v_rows)[..., None]  # (B, H, N, r, C, 1)
    rhs_k = (beta_rows * torch.exp(cum_excl))[..., None] * kc[:, :, :, None]  # (B, H, N, r, C, r)
    solved = torch.linalg.solve_triangular(
        system, torch.cat([rhs_v, rhs_k], dim=-1), upper=False, unitriangular=True
    )  # (B, H, N, r, C, 1 + r)
    u_free = solved[..., 0]  # (B, H, N, r, C)   u = u_free - W s0
    w = solved[..., 1:]  # (B, H, N, r, C, r)

    to_end = torch.exp(cum[..., -1:] - cum)  # (B, H, N, r, C)   exp(P_C - P_j)
    eye_r = torch.eye(rank, dtype=dtype, device=q.device)
    carry = torch.exp(cum[..., -1])[..., None, None] * eye_r  # (B, H, N, r, r, r)
    affine_m = carry - torch.einsum("bhnca,bhnic,bhnicd->bhniad", kc, to_end, w)  # (B, H, N, r, r, r)
    affine_b = torch.einsum("bhnca,bhnic->bhnia", kc, to_end * u_free)  # (B, H, N, r, r)

    s = state.to(dtype)  # (B, H, r, r)
    starts = []
    for i in range(n):  # the only sequential part: one small affine map per chunk
        starts.append(s)
        s = torch.einsum("bhiad,bhid->bhia", affine_m[:, :, i], s) + affine_b[:, :, i]
    s0 = torch.stack(starts, dim=2)  # (B, H, N, r, r)   state at each chunk start

    u = u_free - torch.einsum("bhnicd,bhnid->bhnic", w, s0)  # (B, H, N, r, C)
    reads = torch.exp(cum_excl) * torch.einsum("bhnca,bhnia->bhnic", qc, s0)  # (B, H, N, r, C)
    reads = reads + torch.einsum("bhnitj,bhntj,bhnij->bhnit", decay, qk, u)  # (B, H, N, r, C)
    reads = reads.permute(0, 2, 4, 1, 3).reshape(batch, n * c, heads, rank)[:, :length]  # (B, T, H, r)
    if mask is not None:
        reads = reads * mask.to(dtype)[:, :, None, None]
    return s, reads
