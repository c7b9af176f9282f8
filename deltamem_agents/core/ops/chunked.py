"""The exact chunk-parallel δ-mem scan (the WY / UT form of METHOD.md), for prefill and training.

Each state row i is an independent scalar delta rule with its own gates, sharing q and k. Inside a chunk of C
tokens the write strengths solve a unit-lower-triangular system; the end-of-chunk state is an affine map of the
start state, so only that r x r map is iterated chunk by chunk, and all reads are computed in parallel afterwards.

Speed notes (CPU, r = 8; see docs/benchmarks/): small batched matmuls are slow in torch on CPU, so the layout keeps
the big work in a few wide elementwise passes, one batched triangular solve and one GEMM per chunk.
- The write gate is folded into the decay matrix: with u = beta * z, the system (I + diag(beta) (D * KK)) u = beta y
  becomes (I + (D * KK) diag(beta)) z = y, so one decay tensor D~[t, j] = exp(P-_t - P_j) beta_j serves both the
  system and the reads (sum_j D~[t, j] (q_t . k_j) z_j), and no pass multiplies by beta afterwards.
- The solve works on transposed (row-vector) right-hand sides, the layout LAPACK wants without copies.
Exponents are clamped at 0 before exp (the entries with j >= t are then zeroed by the strictly lower qk / kk
masks), so every exp argument is <= 0 and nothing overflows.
"""

import torch
import torch.nn.functional as F

from deltamem_agents.core.ops.validation import check_scan_inputs, compute_dtype

# log(lambda) is floored so that lambda == 0 (beta == 1 in fp32) cannot produce -inf - (-inf) = NaN.
LOG_LAMBDA_FLOOR = -80.0
# log(beta) is taken of beta clamped here, so masked tokens (beta = 0) keep finite values and gradients; their
# write u = beta * z is still exactly 0.
BETA_FLOOR = 1e-30
DEFAULT_CHUNK = 16


def delta_scan_chunked(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    mask: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
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
    bh = batch * heads  # X: independent (batch, head) pairs

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, r) -> (X, N, C, r)
        return x.reshape(batch, n, c, heads, rank).permute(0, 3, 1, 2, 4).reshape(bh, n, c, rank)

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, r) -> (X, N, r, C)   gates act per state row
        return x.reshape(batch, n, c, heads, rank).permute(0, 3, 1, 4, 2).reshape(bh, n, rank, c)

    qc, kc = tokens(q), tokens(k)  # (X, N, C, r)
    beta_r, v_r, log_r = rows(beta), rows(v), rows(log_lam)  # (X, N, r, C)
    cum = log_r.cumsum(-1)  # (X, N, r, C)   P, inclusive
    cum_excl = cum - log_r  # (X, N, r, C)   P-, exclusive
    col = cum - beta_r.clamp_min(BETA_FLOOR).log()  # (X, N, r, C)   P_j - log beta_j
    decay = (cum_excl[..., :, None] - col[..., None, :]).clamp_max_(0.0).exp_()  # (X, N, r, C, C)   D~
    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)  # (C, C) [t, j], j < t
    qk_kk = (torch.cat([qc, kc], dim=-2) @ kc.transpose(-1, -2)).view(bh, n, 2, 1, c, c) * strictly_lower
    # Two products with one broadcast each (over rows): faster than one product broadcasting two ways.
    read_matrix = decay * qk_kk[:, :, 0]  # (X, N, r, C, C)   D~ * QK
    system = decay * qk_kk[:, :, 1]  # (X, N, r, C, C)   D~ * KK

    # z = z_free - W s0 (per row i), with (I + D~ * KK) [z_free, W] = [v, e^{P-} K]; solved as row vectors.
    e_excl = cum_excl.exp()  # (X, N, r, C)
    kt = kc.transpose(-1, -2)  # (X, N, r, C)
    rhs_t = torch.cat([v_r[..., None, :], e_excl[..., None, :] * kt[:, :, None]], dim=-2)  # (X, N, r, 1+r, C)
    solved = torch.linalg.solve_triangular(
        system.transpose(-1, -2), rhs_t, upper=True, left=False, unitriangular=True
    )  # (X, N, r, 1+r, C)
    z_free, w_t = solved[..., 0, :], solved[..., 1:, :]  # (X, N, r, C), (X, N, r, r, C)

    # End of chunk, per row i as a row vector: s_end = s0 M + b, with u_j = beta_j z_j written with weight
    # exp(P_C - P_j): M[d, a] = e^{P_C} delta_da - sum_j W[j, d] e^{P_C - P_j} beta_j k_j[a].
    to_end = (cum[..., -1:] - cum).exp() * beta_r  # (X, N, r, C)
    weighted = (w_t * to_end[..., None, :]).reshape(bh, n, rank * rank, c)  # (X, N, r*r, C)   one GEMM per chunk
    eye = torch.eye(rank, dtype=dtype, device=q.device)
    m = cum[..., -1, None, None].exp() * eye - (weighted @ kc).view(bh, n, rank, rank, rank)  # (X, N, r, r, r)
    b = (to_end * z_free) @ kc  # (X, N, r, r)
    s0 = _chunk_starts(m, b, state.to(dtype).reshape(bh, rank, rank))  # (X, N, r, r)   state at each chunk start
    s_end = (s0[:, -1, :, None, :] @ m[:, -1])[..., 0, :] + b[:, -1]  # (X, r, r)

    # Tiny per-row products as broadcast multiply + sum: batched matmuls of 1 x r or 1 x C rows are slow on CPU.
    z = z_free - (s0[..., :, None] * w_t).sum(-2)  # (X, N, r, C)   sum over d of s0[i, d] W[i, d, t]
    reads = e_excl * (s0 @ qc.transpose(-1, -2))  # (X, N, r, C)   from the chunk-start state
    reads = reads + (read_matrix * z[..., None, :]).sum(-1)  # (X, N, r, C)   from this chunk's earlier tokens
    reads = reads.reshape(batch, heads, n, rank, c).permute(0, 2, 4, 1, 3).reshape(batch, n * c, heads, rank)
    reads = reads[:, :length]  # (B, T, H, r)
    if mask is not None:
        reads = reads * mask.to(dtype)[:, :, None, None]
    return s_end.reshape(batch, heads, rank, rank), reads


def _chunk_starts(m: torch.Tensor, b: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """State at the start of every chunk: s <- s M_n + b_n per row, from ``s_in``.

    Args: m ``(X, N, r, r, r)``, b ``(X, N, r, r)``, s_in ``(X, r, r)``. Returns ``(X, N, r, r)``.
    """
    x, n, r = m.shape[:3]
    m_seq = m.transpose(0, 1).reshape(n, x * r, r, r)  # (N, X*r, r, r)   contiguous per chunk: cheap indexing
    b_seq = b.transpose(0, 1).reshape(n, x * r, 1, r)  # (N, X*r, 1, r)
    s = s_in.reshape(x * r, 1, r)  # (X*r, 1, r)
    starts = [s]
    for i in range(n - 1):  # the only sequential part: one fused multiply-add per chunk
        s = torch.baddbmm(b_seq[i], s, m_seq[i])
        starts.append(s)
    return torch.stack(starts, dim=1).view(x, r, n, r).transpose(1, 2)
