"""MemoryLayer: the δ-mem parameters of one attention layer, and its read / write computations.

The module holds parameters only. The state S is passed in and returned, never stored here, so one backbone
can serve many conversations at once.

Fast paths (each tested against the reference beside it): the 4-5 input projections run as ONE matmul with a
packed weight, and the corrections add into the projection output with one ``addmm`` using a pre-scaled weight.
Under ``torch.no_grad`` the packed weights are cached and rebuilt only when a parameter changes (its data pointer
or in-place version counter moves: optimizer steps, ``load_state_dict``, ``.to``); with gradients they are built
per call so autograd sees the parameters. A one-token call with writes on (decoding) uses ``delta_step``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltamem_agents.core.backbones import AttentionShapes
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.core.ops import cpu_decode, delta_scan_chunked, delta_scan_recurrent, delta_step
from deltamem_agents.core.ops.kernels import gpu_scan_kernel
from deltamem_agents.core.ops.validation import compute_dtype

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

    def _projection_parameters(self) -> list[nn.Parameter]:
        params = [self.memory_q_proj, self.memory_k_proj, self.memory_v_proj, self.beta_proj, self.beta_bias]
        if self.config.forget_gate == "separate":
            params += [self.lambda_proj, self.lambda_bias]
        return params

    def _cached(self, slot: str, params: list[torch.Tensor], build):
        """``build()`` cached under no-grad until one of ``params`` changes; rebuilt per call with gradients."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        key = [(p._version, p.data_ptr()) for p in params]
        key.append(torch.is_inference_mode_enabled())  # inference tensors must not leak into autograd code
        cache = self.__dict__.setdefault("_fast_cache", {})
        hit = cache.get(slot)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, build())
            cache[slot] = hit
        return hit[1]

    def packed_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, b)``: q, k, v, beta [, lambda] weights stacked ``(n*R, d)`` and their biases ``(n*R,)``."""

        def build():
            params = self._projection_parameters()
            weights = [params[0], params[1], params[2], params[3]] + params[5:6]
            zeros = params[4].new_zeros(3 * self.config.read_dim)
            biases = [zeros, params[4]] + params[6:7]
            return torch.cat(weights, dim=0), torch.cat(biases, dim=0)

        return self._cached("projection", self._projection_parameters(), build)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Memory vectors and gates of each position: q, k, v, beta, lam, each (B, T, H, r) in float32+.

        One matmul with the packed weight; equals :meth:`project_reference` up to float rounding."""
        h, r, width = self.config.num_heads, self.config.rank, self.config.read_dim
        weight, bias = self.packed_projection()  # (n*R, d), (n*R,)
        z = F.linear(x.to(weight.dtype), weight, bias)  # (B, T, n*R)
        lead = z.shape[:-1]
        qk = F.normalize(torch.tanh(z[..., : 2 * width]).view(*lead, 2, h, r), dim=-1, eps=NORM_EPS)  # (B,T,2,H,r)
        v = z[..., 2 * width : 3 * width].view(*lead, h, r)  # (B, T, H, r)
        gates = torch.sigmoid(z[..., 3 * width :]).view(*lead, -1, h, r)  # (B, T, 1 or 2, H, r)
        lam = gates[..., 1, :, :] if self.config.forget_gate == "separate" else None
        return qk[..., 0, :, :], qk[..., 1, :, :], v, gates[..., 0, :, :], lam

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """Only the read query q ``(B, T, H, r)``: all a call with writes off needs."""
        x = x.to(self.memory_q_proj.dtype)  # (B, T, d)
        q = torch.tanh(F.linear(x, self.memory_q_proj))  # (B, T, R)
        return F.normalize(q.view(*x.shape[:-1], self.config.num_heads, self.config.rank), dim=-1, eps=NORM_EPS)

    def project_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The plain form of :meth:`project`: one matmul per projection, as METHOD.md writes it."""
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
        batch, length = x.shape[:2]
        if writes and self.config.write != "segment" and length == 1 and mask is None:  # decoding: one token
            return self.decode_step(x, state)
        if writes and self.config.write != "segment":
            q, k, v, beta, lam = self.project(x)
            scan = delta_scan_recurrent if length <= RECURRENT_MAX_TOKENS else delta_scan_chunked
            if scan is delta_scan_chunked and q.is_cuda:
                scan = gpu_scan_kernel() or scan  # an optional plugin kernel (e.g. deltamem-fla)
            extra = {"chunk_size": self.config.chunk_size} if scan is delta_scan_chunked else {}
            new_state, reads = scan(state, q, k, v, beta, mask=mask, lam=lam, **extra)
            return reads.reshape(batch, length, -1), new_state
        q = self.project_query(x)  # (B, T, H, r)   writes off (or SSW): only the query is needed
        reads = torch.einsum("bhij,bthj->bthi", state.to(q.dtype), q)  # (B, T, H, r)
        if mask is not None:
            reads = reads * mask.to(reads.dtype)[:, :, None, None]
        new_state = state
        if writes:  # segment strategy: every token read the state from before the call
            new_state = self.write_segments(x, state, mask, segment_ids)
        return reads.reshape(batch, length, -1), new_state

    def decode_step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`read_write` for ONE token with writes on (token and multi strategies), in few tensor ops.

        Args: x ``(B, 1, d)``, state ``(B, H, r, r)``. Returns reads ``(B, 1, R)`` and the new state."""
        h, r, width = self.config.num_heads, self.config.rank, self.config.read_dim
        weight, bias = self.packed_projection()  # (n*R, d), (n*R,)
        z = F.linear(x[:, 0].to(weight.dtype), weight, bias)  # (B, n*R)
        qk = torch.tanh(z[:, : 2 * width]).view(-1, 2, h, r)  # (B, 2, H, r)
        qk = qk / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(NORM_EPS)  # = F.normalize
        gates = torch.sigmoid(z[:, 3 * width :]).view(-1, z.shape[-1] // width - 3, h, r)  # (B, 1 or 2, H, r)
        lam = gates[:, 1] if self.config.forget_gate == "separate" else None
        v = z[:, 2 * width : 3 * width].view(-1, h, r)  # (B, H, r)
        if state.dtype != z.dtype:
            dtype = compute_dtype(state, z)
            state, qk, v, gates = state.to(dtype), qk.to(dtype), v.to(dtype), gates.to(dtype)
            lam = lam.to(dtype) if lam is not None else None
        new_state, read = delta_step(state, qk[:, 0], qk[:, 1], v, gates[:, 0], lam)  # (B, H, r, r), (B, H, r)
        return read.view(x.shape[0], 1, width), new_state

    def packed_corrections(self) -> torch.Tensor:
        """Every correction weight times the scale, stacked in ``corrected`` order and transposed: ``(R, sum out)``."""
        weights = [getattr(self, f"delta_{name}_proj") for name in self.corrected]  # (out, R) each
        return self._cached(
            "corrections", weights, lambda: (self.config.scale * torch.cat(weights, 0)).t().contiguous()
        )

    def corrections(self, reads: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every correction from one matmul with the packed weight: ``{name: (B, T, out)}`` (views of one tensor);
        equals :meth:`correction` per name up to float rounding."""
        packed = self.packed_corrections()  # (R, sum out)
        sizes = self.__dict__.get("_correction_sizes")
        if sizes is None:
            sizes = self._correction_sizes = [getattr(self, f"delta_{n}_proj").shape[0] for n in self.corrected]
        product = reads.to(packed.dtype) @ packed  # (B, T, sum out)
        return dict(zip(self.corrected, product.split(sizes, dim=-1)))

    def decode_fused(self, x: torch.Tensor, state: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """One decoding token with writes on through the fused CPU kernel (see ``ops.cpu_decode``).

        Args: x ``(B, 1, d)``, state ``(B, H, r, r)``. Returns ``({name: correction (B, 1, out)}, new_state)``, or
        None when the kernel is disabled or not built, or the tensors are not float32 on the CPU."""
        if not cpu_decode.usable_for(x, state):
            return None
        module = cpu_decode.kernel()
        static = self.__dict__.get("_decode_static")
        if static is None:  # per-layer constants, computed once: names, output sizes, heads, rank, gate kind
            names = self.corrected
            sizes = [getattr(self, f"delta_{n}_proj").shape[0] for n in names]
            cfg = self.config
            static = self._decode_static = (names, sizes, cfg.num_heads, cfg.rank, cfg.forget_gate == "separate")
        if module is None or self.config.write == "segment" or self.memory_q_proj.dtype != torch.float32:
            return None
        names, sizes, heads, rank, separate = static
        params = self._projection_parameters() + [getattr(self, f"delta_{n}_proj") for n in names]

        def build():
            weight, bias = self.packed_projection()
            return weight, bias, self.packed_corrections()

        weight, bias, corrections = self._cached("decode", params, build)  # (n*R, d), (n*R,), (R, sum out)
        *deltas, new_state = module.decode_step(
            x,
            weight,
            bias,
            state,
            corrections,
            sizes,
            heads,
            rank,
            separate,
            NORM_EPS,
        )  # (B, 1, out) per corrected projection, (B, H, r, r)
        return dict(zip(names, deltas)), new_state

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

    def add_correction(self, name: str, reads: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + correction(name, reads)`` with one ``addmm`` and a cached pre-scaled weight.

        Args: reads ``(B, T, R)``, output ``(B, T, out)`` of the corrected projection. Falls back to the plain
        form when dtypes differ (e.g. a bf16 backbone under float32 memory)."""
        weight = getattr(self, f"delta_{name}_proj")  # (out, R)
        if output.dtype != weight.dtype or reads.dtype != weight.dtype:
            return output + self.correction(name, reads).to(output.dtype)
        scaled = self._cached(f"correction_{name}", [weight], lambda: (self.config.scale * weight).t())  # (R, out)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), reads.reshape(-1, reads.shape[-1]), scaled)
        return flat.view(output.shape)  # (B, T, out)
