"""MemoryLayer: the δ-mem parameters of one attention layer, and its read / write computations.

The module holds parameters only. The state S is passed in and returned, never stored here, so one backbone
can serve many conversations at once.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltamem_agents.backbones import AttentionShapes
from deltamem_agents.config import DeltaMemConfig
from deltamem_agents.ops import delta_scan_chunked, delta_scan_recurrent

# Below this many tokens the token loop is cheaper than the chunked form (decode is T = 1).
RECURRENT_MAX_TOKENS = 8
NORM_EPS = 1e-6


class MemoryLayer(nn.Module):
    """δ-mem for one attention layer. Parameter names follow the reference checkpoint format.

    Shapes: d = hidden size, R = H * r.
        memory_q_proj, memory_k_proj, memory_v_proj, beta_proj: (R, d); beta_bias: (R,)
        lambda_proj: (R, d), lambda_bias: (R,)          only with ``forget_gate="separate"``
        delta_q_proj: (q_out, R), delta_o_proj: (o_out, R)
        delta_k_proj: (k_out, R), delta_v_proj: (v_out, R)   only with ``corrections="qkvo"``
    """

    def __init__(self, config: DeltaMemConfig, shapes: AttentionShapes, seed: int = 0):
        super().__init__()
        self.config = config
        read_dim, hidden = config.read_dim, shapes.hidden
        self.memory_q_proj = nn.Parameter(torch.empty(read_dim, hidden))
        self.memory_k_proj = nn.Parameter(torch.empty(read_dim, hidden))
        self.memory_v_proj = nn.Parameter(torch.empty(read_dim, hidden))
        self.beta_proj = nn.Parameter(torch.zeros(read_dim, hidden))
        self.beta_bias = nn.Parameter(torch.full((read_dim,), config.beta_bias_init))
        if config.forget_gate == "separate":
            self.lambda_proj = nn.Parameter(torch.zeros(read_dim, hidden))
            self.lambda_bias = nn.Parameter(torch.full((read_dim,), config.lambda_bias))
        self.delta_q_proj = nn.Parameter(torch.zeros(shapes.q_out, read_dim))
        self.delta_o_proj = nn.Parameter(torch.zeros(shapes.o_out, read_dim))
        if config.corrections == "qkvo":
            self.delta_k_proj = nn.Parameter(torch.zeros(shapes.k_out, read_dim))
            self.delta_v_proj = nn.Parameter(torch.zeros(shapes.v_out, read_dim))
        generator = torch.Generator().manual_seed(seed)
        for weight in (self.memory_q_proj, self.memory_k_proj, self.memory_v_proj):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)

    @property
    def corrected(self) -> tuple[str, ...]:
        """The projections this layer corrects: ('q', 'o') or ('q', 'k', 'v', 'o')."""
        return tuple(self.config.corrections)

    @torch.no_grad()
    def init_corrections(self, base_weights: dict[str, torch.Tensor]) -> None:
        """Base-slice init: column c < r of W_delta is input column c of the frozen weight, L2-normalised,
        times the gain; other columns 0. ``zero`` init leaves every correction at 0."""
        for name in self.corrected:
            target = getattr(self, f"delta_{name}_proj")  # (out, R)
            target.zero_()
            if self.config.correction_init != "base_slice":
                continue
            base = base_weights[name]  # (out, in)
            width = min(self.config.rank, target.shape[1], base.shape[1])
            columns = F.normalize(base[:, :width].detach().float(), dim=0, eps=NORM_EPS)  # (out, width)
            target[:, :width].copy_(columns * self.config.correction_gain)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Memory vectors and gates of each position: q, k, v, beta, lam, each (B, T, H, r) in float32+."""
        h, r = self.config.num_heads, self.config.rank
        x = x.to(self.memory_q_proj.dtype)  # (B, T, d)
        shape = (*x.shape[:-1], h, r)
        q = F.normalize(torch.tanh(F.linear(x, self.memory_q_proj)).view(shape), dim=-1, eps=NORM_EPS)
        k = F.normalize(torch.tanh(F.linear(x, self.memory_k_proj)).view(shape), dim=-1, eps=NORM_EPS)
        v = F.linear(x, self.memory_v_proj).view(shape)  # (B, T, H, r)
        beta = torch.sigmoid(F.linear(x, self.beta_proj, self.beta_bias)).view(shape)  # (B, T, H, r)
        if self.config.forget_gate == "separate":
            lam = torch.sigmoid(F.linear(x, self.lambda_proj, self.lambda_bias)).view(shape)
        else:
            lam = None  # the scan uses 1 - beta
        return q, k, v, beta, lam

    def read_write(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        writes: bool,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the memory for every position of ``x`` and (if ``writes``) write it.

        Args:
            x: ``(B, T, d)`` attention input (hidden state after the layer's input norm).
            state: ``(B, H, r, r)`` state before this call.
            writes: write the state; when false every position reads ``state``.
            mask: ``(B, T)`` true for real tokens; padding neither reads (read = 0) nor writes.
            segment_ids: ``(B, T)`` message index per token for the ``segment`` strategy (-1: not written).

        Returns:
            ``(reads, new_state)``: reads ``(B, T, R)`` in float32+, new_state ``(B, H, r, r)``.
        """
        q, k, v, beta, lam = self.project(x)
        batch, length = x.shape[:2]
        if writes and self.config.write != "segment":
            scan = delta_scan_recurrent if length <= RECURRENT_MAX_TOKENS else delta_scan_chunked
            extra = {} if scan is delta_scan_recurrent else {"chunk_size": self.config.chunk_size}
            new_state, reads = scan(state, q, k, v, beta, mask=mask, lam=lam, **extra)
            return reads.reshape(batch, length, -1), new_state
        reads = torch.einsum("bhij,bthj->bthi", state.to(q.dtype), q)  # (B, T, H, r)
        if mask is not None:
            reads = reads * mask.to(reads.dtype)[:, :, None, None]
        new_state = state
        if writes:  # segment strategy: every token read the state from before the call
            new_state = self.write_segments(x, state, mask, segment_ids)
        return reads.reshape(batch, length, -1), new_state

    def write_segments(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """SSW: average x over each segment (one chat message) and make ONE write per segment, in id order."""
        if segment_ids is None:
            return state  # nothing marked as a message: nothing is written (see docs/memory.md)
        ids = segment_ids.to(x.device).long()  # (B, T)
        if mask is not None:
            ids = ids.masked_fill(~mask.to(torch.bool), -1)
        count = int(ids.max().item()) + 1
        if count <= 0:
            return state
        onehot = (ids[..., None] == torch.arange(count, device=x.device)).to(self.memory_q_proj.dtype)  # (B,T,n)
        sizes = onehot.sum(dim=1)  # (B, n)
        means = onehot.transpose(1, 2) @ x.to(onehot.dtype) / sizes.clamp_min(1)[..., None]  # (B, n, d)
        q, k, v, beta, lam = self.project(means)
        new_state, _ = delta_scan_recurrent(state, q, k, v, beta, mask=sizes > 0, lam=lam)
        return new_state

    def correction(self, name: str, reads: torch.Tensor) -> torch.Tensor:
        """``scale * W_delta_name @ read``: ``(B, T, R)`` -> ``(B, T, out)``."""
        weight = getattr(self, f"delta_{name}_proj")  # (out, R)
        return self.config.scale * F.linear(reads.to(weight.dtype), weight)
