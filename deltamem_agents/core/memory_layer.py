"""MemoryLayer: the δ-mem parameters of one attention layer, and its one forward (read, write, corrections).

The module holds parameters only. The state S is passed in and returned, never stored here, so one backbone
can serve many conversations at once.

    corrections, new_state = memory(x, state, writes, mask, segment_ids)

``forward`` picks ONE compute path from :func:`choose_path` (the whole table is that function), runs it, and
turns the reads into the corrections ``{name: (B, T, out)}`` of the corrected projections. Beside it,
:meth:`MemoryLayer.forward_reference` is the plain form (one matmul per projection, the token loop, a loop over
messages): every fast path is tested against it (corrections, states and gradients).

Fast-path details: the 4-5 input projections run as ONE matmul with a packed weight (see :class:`PackedWeights`);
corrections stay factored (:class:`Corrections`, reads times a pre-scaled weight block) and are added to each
projection's output in one ``addmm``; with writes off the state is folded into those weights once per state
(:meth:`MemoryLayer.read_operator`), so a read is the query projection and one ``addmm`` per projection.
"""

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

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


class ComputePath(StrEnum):
    """The compute paths of one memory call (docs/memory.md, "Compute paths", says which serves what)."""

    READ = "read"  # writes off: query projection + r x r read (the chat's decode and read prefill)
    READ_FUSED_CPU = "read_fused_cpu"  # READ of one token in one call of the CPU kernel (ops.cpu_decode)
    STEP = "step"  # one token, writes on, no padding: delta_step (generate() with writes on)
    FUSED_CPU = "fused_cpu"  # STEP in one call of the CPU kernel (ops.cpu_decode; on when built)
    RECURRENT = "recurrent"  # <= RECURRENT_MAX_TOKENS tokens, writes on: the token loop
    CHUNKED = "chunked"  # longer writes (prefill, training with autograd): the chunk-parallel scan
    GPU_PLUGIN = "gpu_plugin"  # CHUNKED on CUDA through an optional plugin kernel (ops.kernels)
    SEGMENT = "segment"  # SSW with writes on: read the pre-call state, ONE write per message


def choose_path(
    write: str,
    length: int,
    writes: bool,
    padded: bool,
    cuda: bool = False,
    cpu_kernel: bool = False,
    gpu_kernel: bool = False,
) -> ComputePath:
    """The one table of compute paths.

    Args:
        write: the config's write strategy (``token``, ``segment`` or ``multi``).
        length: T, tokens in this call.
        writes: whether this call writes the state.
        padded: whether some tokens are padding (a mask is given).
        cuda: the tensors are on a CUDA device.
        cpu_kernel: the fused CPU decode kernel is enabled, built and applies to these tensors.
        gpu_kernel: an optional GPU scan plugin is installed and enabled.
    """
    if not writes:
        return ComputePath.READ_FUSED_CPU if cpu_kernel and length == 1 and not padded else ComputePath.READ
    if write == "segment":
        return ComputePath.SEGMENT
    if length == 1 and not padded:
        return ComputePath.FUSED_CPU if cpu_kernel else ComputePath.STEP
    if length <= RECURRENT_MAX_TOKENS:
        return ComputePath.RECURRENT
    if cuda and gpu_kernel:
        return ComputePath.GPU_PLUGIN
    return ComputePath.CHUNKED


@dataclass(frozen=True)
class PackedWeights:
    """The layer's weights packed for the fast paths (built from the parameters; never trained directly).

    Attributes:
        projection: ``(n*R, d)`` memory q, k, v, beta [, lambda] weights stacked (n = 4 or 5).
        bias: ``(n*R,)`` zeros for q, k, v, then b_beta [, b_lambda].
        query: ``(d, R)`` the memory query weight transposed (all a read with writes off needs).
        corrections: ``(R, sum out)`` every correction weight times the scale, stacked in ``corrected`` order
            and transposed, so ``reads @ corrections`` gives all corrections at once.
        sizes: the output size of each corrected projection (to split that product).
        slices: per corrected name, its ``(R, out)`` column block of ``corrections`` (a view).
        columns: per corrected name, the slice of ``sum out`` its block covers.
    """

    projection: torch.Tensor
    bias: torch.Tensor
    query: torch.Tensor
    corrections: torch.Tensor
    sizes: tuple[int, ...]
    slices: dict[str, torch.Tensor]
    columns: dict[str, slice]


class Corrections(Mapping):
    """The corrections of one call, ``{name: (B, T, out)}``, kept factored as ``factor @ weights[name]`` until
    used, so that :meth:`add_to` adds one to its projection's output in ONE ``addmm`` (no separate matmul, no
    temporary). Indexing materialises a correction (tests, fused q/k/v projections).

    Args:
        factor: ``(B*T, R)`` the reads (or, with writes off, the unit queries), flattened over (B, T).
        lead: ``(B, T)``.
        weights: per name ``(R, out)``, or ``(B, R, out)`` (one per example), so correction = factor @ weight.
        done: finished corrections ``(B, T, sum out)`` instead (the fused CPU kernel computes them itself), with
            ``columns``: per name, its slice of the last dim.
    """

    def __init__(self, factor=None, lead=None, weights=None, done: torch.Tensor | None = None, columns=None):
        self.factor, self.lead, self.weights, self.done = factor, lead, weights, done
        if done is not None:
            self.weights = columns  # name -> slice of done's last dim

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.done is not None:
            return self.done[..., self.weights[name]]  # (B, T, out) view
        weight = self.weights[name]  # (R, out) or (B, R, out)
        factor = self.factor.to(weight.dtype)
        if weight.dim() == 3:
            return factor.view(*self.lead, -1) @ weight  # (B, T, out)
        return (factor @ weight).view(*self.lead, -1)  # (B, T, out)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def add_to(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """``output + self[name]`` for a projection output ``(B, T, out)``, in one op where dtypes allow (in
        place without autograd: the output is the projection's fresh result)."""
        if self.done is None and self.weights[name].dim() == 2:
            weight = self.weights[name]  # (R, out)
            if output.dtype == weight.dtype == self.factor.dtype:
                if not torch.is_grad_enabled() and output.is_contiguous():
                    output.view(-1, output.shape[-1]).addmm_(self.factor, weight)
                    return output
                flat = torch.addmm(output.reshape(-1, output.shape[-1]), self.factor, weight)  # (B*T, out)
                return flat.view(output.shape)
        if self.done is not None and not torch.is_grad_enabled():  # the kernel's result, added in place by it
            library = cpu_decode.kernel()
            if library is not None and cpu_decode.add_columns(library, output, self.done, self.weights[name]):
                return output
        delta = self[name]  # (B, T, out)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))


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
        # The packed-weight cache (see packed_weights): (key of the parameters it was built from, PackedWeights).
        self._packed_cache: tuple[tuple, PackedWeights] | None = None
        # The read-operator cache (see read_operator): (weakref to the state, its version, PackedWeights, N).
        self._read_cache: tuple | None = None
        # Whether the fused CPU kernel's buffers fit this layer's sizes (ops.cpu_decode.supports).
        self._kernel_fits = cpu_decode.supports(config.num_heads, config.rank)

    @property
    def corrected(self) -> tuple[str, ...]:
        """The projections this layer corrects: ('q', 'o') or ('q', 'k', 'v', 'o')."""
        return tuple(self.config.corrections)

    @property
    def separate_forget_gate(self) -> bool:
        return self.config.forget_gate == "separate"

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

    # the one forward

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        writes: bool,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[Corrections, torch.Tensor]:
        """Read the memory for every position of ``x``, write it (if ``writes``), and return the corrections.

        Args:
            x: ``(B, T, d)`` attention input (hidden state after the layer's input norm).
            state: ``(B, H, r, r)`` state before this call.
            writes: write the state; when false every position reads ``state``.
            mask: ``(B, T)`` true for real tokens; padding neither reads (read = 0) nor writes.
            segment_ids: ``(B, T)`` message index per token for the ``segment`` strategy (-1: not written).

        Returns:
            ``(corrections, new_state)``: a :class:`Corrections` mapping ``{name: (B, T, out)}`` per corrected
            projection (float32+; ``corrections.add_to(name, output)`` adds one to its projection's output) and
            the new state ``(B, H, r, r)``.
        """
        path = self.path_for(x, state, writes, mask)
        packed = self.packed_weights()
        if path is ComputePath.READ_FUSED_CPU:
            return self._read_fused_cpu(x, state, packed), state
        if path is ComputePath.READ:
            return self.read_corrections(x, state, mask, packed), state
        if path is ComputePath.FUSED_CPU:
            return self._step_fused_cpu(x, state, packed)
        if path is ComputePath.SEGMENT:  # every token reads the state from before the call
            return self.read_corrections(x, state, mask, packed), self.write_segments(x, state, mask, segment_ids)
        reads, new_state = self._read_write(path, x, state, mask, segment_ids, packed)  # (B, T, R), (B, H, r, r)
        return self.corrections(reads, packed), new_state

    def path_for(
        self, x: torch.Tensor, state: torch.Tensor, writes: bool, mask: torch.Tensor | None, fused: bool = True
    ) -> ComputePath:
        """The :func:`choose_path` entry for these tensors (``fused=False`` excludes the fused CPU kernel)."""
        length = x.shape[1]
        cpu_kernel = (
            fused
            and length == 1
            and mask is None
            and self._kernel_fits
            and cpu_decode.kernel() is not None
            and cpu_decode.usable_for(x, state, self.memory_q_proj)
            and (writes or state.shape[0] == 1 or state.shape[0] == x.shape[0])
        )
        gpu_kernel = x.is_cuda and writes and length > RECURRENT_MAX_TOKENS and gpu_scan_kernel() is not None
        return choose_path(self.config.write, length, writes, mask is not None, x.is_cuda, cpu_kernel, gpu_kernel)

    def read_write(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        writes: bool,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without the corrections: ``(reads (B, T, R) float32+, new_state (B, H, r, r))``."""
        path = self.path_for(x, state, writes, mask, fused=False)
        return self._read_write(path, x, state, mask, segment_ids)

    def _read_write(
        self,
        path: ComputePath,
        x: torch.Tensor,
        state: torch.Tensor,
        mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        packed: "PackedWeights | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = x.shape[:2]
        if path is ComputePath.STEP:
            return self.decode_step(x, state, packed)
        if path in (ComputePath.READ, ComputePath.SEGMENT):  # every token reads the state from before the call
            q = self.project_query(x)  # (B, T, H, r)
            reads = torch.einsum("bhij,bthj->bthi", state.to(q.dtype), q)  # (B, T, H, r)
            if mask is not None:
                reads = reads * mask.to(reads.dtype)[:, :, None, None]
            new_state = self.write_segments(x, state, mask, segment_ids) if path is ComputePath.SEGMENT else state
            return reads.reshape(batch, length, -1), new_state
        q, k, v, beta, lam = self.project(x, packed)  # (B, T, H, r) each; lam None when tied
        if path is ComputePath.RECURRENT:
            new_state, reads = delta_scan_recurrent(state, q, k, v, beta, mask=mask, lam=lam)
        else:  # CHUNKED, GPU_PLUGIN: same contract; the plugin may ignore chunk_size
            scan = gpu_scan_kernel() if path is ComputePath.GPU_PLUGIN else delta_scan_chunked
            new_state, reads = scan(state, q, k, v, beta, mask=mask, lam=lam, chunk_size=self.config.chunk_size)
        return reads.reshape(batch, length, -1), new_state  # (B, T, R), (B, H, r, r)

    # projections

    def packed_weights(self) -> PackedWeights:
        """The :class:`PackedWeights` of the current parameters.

        Under ``torch.no_grad`` (serving) they are cached on the module and rebuilt only when a parameter
        changes: its in-place version counter (optimizer steps, ``copy_``) or its data pointer (``.to``,
        ``load_state_dict`` with assign) moves. With gradients they are built per call, so autograd sees the
        parameters."""
        params = self._parameters.values()  # this module's own parameters (it has no submodules)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._build_packed()
        # Inference-mode tensors must not leak into code that runs with autograd later: part of the key.
        key = [torch.is_inference_mode_enabled(), *[(p._version, p.data_ptr()) for p in params]]
        if self._packed_cache is None or self._packed_cache[0] != key:
            with torch.no_grad():
                self._packed_cache = (key, self._build_packed())
        return self._packed_cache[1]

    def _build_packed(self) -> PackedWeights:
        weights = [self.memory_q_proj, self.memory_k_proj, self.memory_v_proj, self.beta_proj]  # (R, d) each
        biases = [self.beta_bias.new_zeros(3 * self.config.read_dim), self.beta_bias]
        if self.separate_forget_gate:
            weights.append(self.lambda_proj)
            biases.append(self.lambda_bias)
        deltas = [getattr(self, f"delta_{name}_proj") for name in self.corrected]  # (out, R) each
        sizes = tuple(d.shape[0] for d in deltas)
        corrections = (self.config.scale * torch.cat(deltas, dim=0)).t().contiguous()  # (R, sum out)
        return PackedWeights(
            projection=torch.cat(weights, dim=0),  # (n*R, d)
            bias=torch.cat(biases, dim=0),  # (n*R,)
            query=self.memory_q_proj.t().contiguous(),  # (d, R)
            corrections=corrections,
            sizes=sizes,
            slices=dict(zip(self.corrected, corrections.split(sizes, dim=1))),  # (R, out) views
            columns={name: slice(sum(sizes[:i]), sum(sizes[: i + 1])) for i, name in enumerate(self.corrected)},
        )

    def project(self, x: torch.Tensor, packed: PackedWeights | None = None) -> tuple[torch.Tensor, ...]:
        """Memory vectors and gates: q, k, v, beta, lam, each ``(*lead, H, r)`` for ``x`` of ``(*lead, d)``.

        One matmul with the packed weight; equals :meth:`project_reference` up to float rounding. ``lam`` is
        None for the tied gate (the scans then use 1 - beta)."""
        h, r, width = self.config.num_heads, self.config.rank, self.config.read_dim
        packed = packed or self.packed_weights()
        z = F.linear(x.to(packed.projection.dtype), packed.projection, packed.bias)  # (*lead, n*R)
        lead = z.shape[:-1]
        qk = _unit(torch.tanh(z[..., : 2 * width]).view(*lead, 2, h, r))  # (*lead, 2, H, r)
        v = z[..., 2 * width : 3 * width].view(*lead, h, r)  # (*lead, H, r)
        gates = torch.sigmoid(z[..., 3 * width :]).view(*lead, -1, h, r)  # (*lead, 1 or 2, H, r)
        lam = gates[..., 1, :, :] if self.separate_forget_gate else None
        return qk[..., 0, :, :], qk[..., 1, :, :], v, gates[..., 0, :, :], lam

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """Only the read query q ``(B, T, H, r)``: all a call with writes off needs."""
        x = x.to(self.memory_q_proj.dtype)  # (B, T, d)
        q = torch.tanh(F.linear(x, self.memory_q_proj))  # (B, T, R)
        return _unit(q.view(*x.shape[:-1], self.config.num_heads, self.config.rank))  # (B, T, H, r)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The write and forget gates ``(beta, lam)`` of every position, each ``(B, T, H, r)``.

        ``lam`` is ``1 - beta`` for the tied gate. Training uses ``beta`` for the gate regulariser."""
        shape = (*x.shape[:-1], self.config.num_heads, self.config.rank)
        x = x.to(self.beta_proj.dtype)  # (B, T, d)
        beta = torch.sigmoid(F.linear(x, self.beta_proj, self.beta_bias)).view(shape)  # (B, T, H, r)
        if self.separate_forget_gate:
            lam = torch.sigmoid(F.linear(x, self.lambda_proj, self.lambda_bias)).view(shape)  # (B, T, H, r)
        else:
            lam = 1.0 - beta
        return beta, lam

    def corrections(self, reads: torch.Tensor, packed: PackedWeights | None = None) -> Corrections:
        """The corrections ``{name: (B, T, out)}`` of reads ``(B, T, R)``, factored as ``reads @ (R, out)`` blocks
        of the packed pre-scaled weight; equal :meth:`correction` per name up to float rounding."""
        packed = packed or self.packed_weights()
        factor = reads.reshape(-1, reads.shape[-1]).to(packed.corrections.dtype)  # (B*T, R)
        return Corrections(factor, reads.shape[:-1], packed.slices)

    # reads with writes off

    def read_operator(self, state: torch.Tensor, packed: PackedWeights | None = None) -> dict[str, torch.Tensor]:
        """Per corrected name ``N (B, R, out)`` (``(R, out)`` for a batch-1 state): the state folded into the
        packed corrections, so that with writes off a correction of a query is ONE matmul, ``q_flat @ N``:

            corrections = (S q) @ W = q @ N,   N[b, h*r + j, :] = sum_i S[b, h, i, j] W[h*r + i, :]

        Without autograd it is cached for the last state tensor seen (held by a weak reference and checked with
        its in-place version) and the current packed weights: a chat decodes many tokens from one state."""
        packed = packed or self.packed_weights()
        if torch.is_grad_enabled() and (state.requires_grad or packed.corrections.requires_grad):
            return self._build_read_operator(state, packed)
        hit = self._read_cache
        if hit is not None and hit[0]() is state and hit[1] == state._version and hit[2] is packed:
            return hit[3]
        with torch.no_grad():
            operator = self._build_read_operator(state, packed)
        self._read_cache = (weakref.ref(state), state._version, packed, operator)
        return operator

    def _build_read_operator(self, state: torch.Tensor, packed: PackedWeights) -> dict[str, torch.Tensor]:
        h, r = self.config.num_heads, self.config.rank
        weight = packed.corrections.view(h, r, -1)  # (H, r, sum out)   row h*r + i
        operator = torch.einsum("bhij,hio->bhjo", state.to(weight.dtype), weight)  # (B, H, r, sum out)
        operator = operator.reshape(state.shape[0], h * r, -1)  # (B, R, sum out)
        operator = operator[0] if state.shape[0] == 1 else operator  # 2D: one plain addmm per projection
        return dict(zip(self.corrected, operator.split(packed.sizes, dim=-1)))  # name -> ([B,] R, out) views

    def read_corrections(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        mask: torch.Tensor | None = None,
        packed: PackedWeights | None = None,
    ) -> Corrections:
        """Corrections ``{name: (B, T, out)}`` of a read of ``state`` (writes off), factored as the unit query
        times :meth:`read_operator`: the query projection, then one matmul per projection (fused into its
        output by ``Corrections.add_to``). A batch-1 state serves an input of any batch (broadcast)."""
        packed = packed or self.packed_weights()
        flat = x.reshape(-1, x.shape[-1])  # (B*T, d)
        if flat.dtype != packed.query.dtype:
            flat = flat.to(packed.query.dtype)
        q = torch.mm(flat, packed.query)  # (B*T, R)
        inplace = not torch.is_grad_enabled()  # serving: no temporaries
        q = q.tanh_() if inplace else torch.tanh(q)
        q = _unit_heads(q, self.config.num_heads, self.config.rank, inplace)  # (B*T, R)
        if mask is not None:
            q = q * mask.reshape(-1, 1).to(q.dtype)  # padding reads 0
        return Corrections(q, x.shape[:-1], self.read_operator(state, packed))  # name -> ([B,] R, out)

    # one-token and segment writes

    def decode_step(
        self, x: torch.Tensor, state: torch.Tensor, packed: PackedWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read and write ONE token (token and multi strategies) with :func:`delta_step`.

        Args: x ``(B, 1, d)``, state ``(B, H, r, r)``. Returns reads ``(B, 1, R)`` and the new state."""
        q, k, v, beta, lam = self.project(x[:, 0], packed)  # (B, H, r) each
        if state.dtype != q.dtype:
            dtype = compute_dtype(state, q)
            state, q, k, v, beta = (t.to(dtype) for t in (state, q, k, v, beta))
            lam = lam.to(dtype) if lam is not None else None
        new_state, read = delta_step(state, q, k, v, beta, lam)  # (B, H, r, r), (B, H, r)
        return read.view(x.shape[0], 1, self.config.read_dim), new_state  # (B, 1, R), (B, H, r, r)

    def _step_fused_cpu(
        self, x: torch.Tensor, state: torch.Tensor, packed: PackedWeights
    ) -> tuple[Corrections, torch.Tensor]:
        """ComputePath.FUSED_CPU: :meth:`decode_step` and the corrections in one call of the C++ kernel.

        Args: x ``(B, 1, d)``, state ``(B, H, r, r)``; float32 on the CPU, no autograd (see ``path_for``)."""
        cfg = self.config
        delta, new_state = cpu_decode.decode_step(
            cpu_decode.kernel(), x, packed.projection, packed.bias, state, packed.corrections,
            cfg.num_heads, cfg.rank, self.separate_forget_gate, NORM_EPS,
        )  # (B, 1, Q), (B, H, r, r)  # fmt: skip
        return Corrections(done=delta, columns=packed.columns), new_state

    def _read_fused_cpu(self, x: torch.Tensor, state: torch.Tensor, packed: PackedWeights) -> Corrections:
        """ComputePath.READ_FUSED_CPU: :meth:`read_corrections` of one token in one call of the C++ kernel.

        Args: x ``(B, 1, d)``, state ``(B or 1, H, r, r)``; float32 on the CPU, no autograd."""
        cfg = self.config
        delta = cpu_decode.read_step(
            cpu_decode.kernel(), x, packed.projection, state, packed.corrections, cfg.num_heads, cfg.rank, NORM_EPS
        )  # (B, 1, Q)
        return Corrections(done=delta, columns=packed.columns)

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
        q, k, v, beta, lam = self.project(means)  # (B, n, H, r) each
        new_state, _ = delta_scan_recurrent(state, q, k, v, beta, mask=sizes > 0, lam=lam)
        return new_state

    # the plain reference (METHOD.md as written), for tests

    def project_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The plain form of :meth:`project`: one matmul per projection, as METHOD.md writes it."""
        shape = (*x.shape[:-1], self.config.num_heads, self.config.rank)
        x = x.to(self.memory_q_proj.dtype)  # (B, T, d)
        q = F.normalize(torch.tanh(F.linear(x, self.memory_q_proj)).view(shape), dim=-1, eps=NORM_EPS)
        k = F.normalize(torch.tanh(F.linear(x, self.memory_k_proj)).view(shape), dim=-1, eps=NORM_EPS)
        v = F.linear(x, self.memory_v_proj).view(shape)  # (B, T, H, r)
        beta, lam = self.gates(x)  # (B, T, H, r) each
        return q, k, v, beta, (lam if self.separate_forget_gate else None)

    def correction(self, name: str, reads: torch.Tensor) -> torch.Tensor:
        """``scale * W_delta_name @ read``: ``(B, T, R)`` -> ``(B, T, out)``."""
        weight = getattr(self, f"delta_{name}_proj")  # (out, R)
        return self.config.scale * F.linear(reads.to(weight.dtype), weight)

    def forward_reference(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        writes: bool,
        mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`forward` in the plainest form: per-projection matmuls, the token loop for token writes, a
        Python loop over messages for segment writes, one matmul per correction. Slow; for tests."""
        batch, length = x.shape[:2]
        q, k, v, beta, lam = self.project_reference(x)  # (B, T, H, r) each
        if writes and self.config.write != "segment":
            new_state, reads = delta_scan_recurrent(state, q, k, v, beta, mask=mask, lam=lam)
        else:
            reads = torch.einsum("bhij,bthj->bthi", state.to(q.dtype), q)  # (B, T, H, r)
            if mask is not None:
                reads = reads * mask.to(reads.dtype)[:, :, None, None]
            new_state = state
            if writes and segment_ids is not None:
                new_state = self._write_segments_reference(x, state, mask, segment_ids)
        reads = reads.reshape(batch, length, -1)  # (B, T, R)
        return {name: self.correction(name, reads) for name in self.corrected}, new_state

    def _write_segments_reference(self, x, state, mask, segment_ids) -> torch.Tensor:
        """One write per message, message by message and example by example."""
        out = []
        for b in range(x.shape[0]):
            s = state[b : b + 1]  # (1, H, r, r)
            ids = segment_ids[b].long()
            if mask is not None:
                ids = ids.masked_fill(~mask[b].to(torch.bool), -1)
            for segment in range(int(ids.max().item()) + 1):
                chosen = ids == segment
                if bool(chosen.any()):
                    mean = x[b, chosen].mean(dim=0).view(1, 1, -1)  # (1, 1, d)
                    q, k, v, beta, lam = self.project_reference(mean)  # (1, 1, H, r) each
                    s, _ = delta_scan_recurrent(s, q, k, v, beta, lam=lam)
            out.append(s)
        return torch.cat(out, dim=0)  # (B, H, r, r)


def _unit_heads(x: torch.Tensor, heads: int, rank: int, inplace: bool) -> torch.Tensor:
    """:func:`_unit` per head of ``x (N, H*r)``; in place when ``inplace`` (no autograd)."""
    parts = x if heads == 1 else x.view(-1, heads, rank)  # (N, r) or (N, H, r)
    norm = torch.linalg.vector_norm(parts, dim=-1, keepdim=True)  # (N, [H,] 1)
    if inplace:
        return parts.div_(norm.clamp_min_(NORM_EPS)).view(x.shape)
    return (parts / norm.clamp_min(NORM_EPS)).view(x.shape)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim (= ``F.normalize(x, dim=-1, eps=NORM_EPS)``, in fewer ops)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)
