"""Shape and dtype checks shared by the scan implementations."""

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulate in float64 when any input is float64, else in float32 (never in half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_scan_inputs(state, q, k, v, beta, mask, lam) -> None:
    """Raise ValueError naming the offending argument when shapes do not fit ``(B, T, H, r)``."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, r), got shape {tuple(q.shape)}")
    b, t, h, r = q.shape
    for name, x in (("k", k), ("v", v), ("beta", beta), ("lam", lam)):
        if x is not None and tuple(x.shape) != (b, t, h, r):
            raise ValueError(f"{name} must have q's shape {(b, t, h, r)}, got {tuple(x.shape)}")
    if tuple(state.shape) != (b, h, r, r):
        raise ValueError(f"state must be (B, H, r, r) = {(b, h, r, r)}, got {tuple(state.shape)}")
    if mask is not None and tuple(mask.shape) != (b, t):
        raise ValueError(f"mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
