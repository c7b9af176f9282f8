"""DecodePlan: one decoding token through every memory layer with the fused CPU kernel, the bookkeeping done once.

Inside the model every Python step of the memory runs after the backbone has streamed megabytes of weights
through the caches, so each costs several times what it costs in a tight loop (docs/benchmarks/). For the
common decode call (one token, no padding, no autograd, float32 CPU, the kernel built) the decoder's pre-hook
therefore prepares, for all layers at once, what :meth:`MemoryLayer.forward` would work out per layer: the path,
the checked packed weights, the state, the output buffers and the kernel's arguments. Each layer then makes one
kernel call in its q projection (which also adds the q correction into q's output in place) and one in-place add
in each other corrected projection.

It computes exactly what :meth:`MemoryLayer.forward` computes on its ``read_fused_cpu`` / ``fused_cpu`` paths
(same kernel); tests compare decoding with and without it against pure torch (tests/test_fast_paths.py).
When anything does not fit, :func:`plan_for` returns None and every layer takes ``MemoryLayer.forward``.
"""

from dataclasses import dataclass

import torch

from deltamem_agents.core.carrier import MemoryCarrier
from deltamem_agents.core.memory_layer import NORM_EPS, MemoryLayer
from deltamem_agents.core.ops import cpu_decode


@dataclass
class LayerStep:
    """One layer's prepared kernel call.

    Attributes:
        writes: write the state (``deltamem_decode_step``) or only read it (``deltamem_read_step``).
        state: ``(B or 1, H, r, r)`` the state read; new_state ``(B, H, r, r)`` the buffer written (writes on).
        delta: ``(B, 1, Q)`` the corrections buffer (columns of the first projection stay unused).
        pointers: the kernel's weight arguments (data pointers of the packed weights).
        sizes: ``(d, nR, H, r, Q, first, separate)``; columns: per corrected name, its ``(start, width)``.
        packed: the PackedWeights the pointers point into (held, so they stay alive for the call).
    """

    writes: bool
    state: torch.Tensor
    new_state: torch.Tensor | None
    delta: torch.Tensor
    pointers: tuple[int, ...]
    sizes: tuple[int, ...]
    columns: dict[str, tuple[int, int]]
    packed: object


class DecodePlan:
    """The prepared kernel calls of one forward call (one per memory layer; None: empty state, writes off)."""

    def __init__(self, library, carrier: MemoryCarrier, steps: list[LayerStep | None]):
        self.library, self.carrier, self.steps = library, carrier, steps

    def first(self, position: int, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Run layer ``position``'s memory for its attention input ``x (B, 1, d)``; add the first correction into
        that projection's ``output (B, 1, out)`` in place; keep the others for :meth:`add`."""
        step = self.steps[position]
        if step is None:
            return output  # empty memory, no writes: every read is 0
        x = x if x.is_contiguous() else x.contiguous()
        d, n_rows, heads, rank, total, first, separate = step.sizes
        if step.writes:
            weight, bias, corrections = step.pointers
            self.library.deltamem_decode_step(
                x.data_ptr(), weight, bias, step.state.data_ptr(), corrections, step.new_state.data_ptr(),
                step.delta.data_ptr(), output.data_ptr(), x.shape[0], d, n_rows, heads, rank, total, first,
                separate, NORM_EPS,
            )  # fmt: skip
            self.carrier.states[position] = step.new_state
        else:
            weight, corrections = step.pointers
            self.library.deltamem_read_step(
                x.data_ptr(), weight, step.state.data_ptr(), corrections, step.delta.data_ptr(), output.data_ptr(),
                x.shape[0], d, heads, rank, total, first, step.state.shape[0], NORM_EPS,
            )  # fmt: skip
        return output

    def add(self, position: int, name: str, output: torch.Tensor) -> torch.Tensor:
        """Add correction ``name`` of layer ``position`` into its projection's ``output (B, 1, out)`` in place."""
        step = self.steps[position]
        if step is None:
            return output
        start, width = step.columns[name]
        total = step.sizes[4]
        self.library.deltamem_add_rows(
            output.data_ptr(), width, step.delta.data_ptr() + 4 * start, total, output.shape[0], width
        )
        return output


def plan_for(
    modules: list[MemoryLayer], carrier: MemoryCarrier, batch: int, length: int | None, masked: bool, dtype
) -> DecodePlan | None:
    """The :class:`DecodePlan` of one forward call, or None when the fused decode does not apply (more than one
    token, padding, autograd, not float32 CPU, SSW writes, the kernel not built or off, sizes it does not fit).

    Args:
        modules: the memory layers in order; carrier: the call's memory; batch, length: of the input tokens;
        masked: some tokens are padding; dtype: the backbone projections' dtype (their outputs get corrected)."""
    if length != 1 or masked or dtype != torch.float32 or torch.is_grad_enabled():
        return None
    library = cpu_decode.kernel()
    if library is None:
        return None
    writes = carrier.writes
    steps = []
    for position, memory in enumerate(modules):
        cfg = memory.config
        if not memory._kernel_fits or memory.memory_q_proj.dtype != torch.float32 or memory.memory_q_proj.is_cuda:
            return None
        if writes and cfg.write == "segment":
            return None
        state = carrier.states[position]
        if state is None:
            if not writes:
                steps.append(None)
                continue
            state = torch.zeros(batch, cfg.num_heads, cfg.rank, cfg.rank)
        if state.dtype != torch.float32 or state.is_cuda or state.shape[0] not in (1, batch):
            return None
        if writes and state.shape[0] != batch:
            state = state.expand(batch, -1, -1, -1)
        state = state if state.is_contiguous() else state.contiguous()
        packed = memory.packed_weights()
        total = packed.corrections.shape[1]
        if writes:
            pointers = (packed.projection.data_ptr(), packed.bias.data_ptr(), packed.corrections.data_ptr())
        else:
            pointers = (packed.projection.data_ptr(), packed.corrections.data_ptr())
        steps.append(
            LayerStep(
                writes=writes,
                state=state,
                new_state=torch.empty_like(state) if writes else None,
                delta=torch.empty(batch, 1, total),
                pointers=pointers,
                sizes=(
                    packed.projection.shape[1],
                    packed.projection.shape[0],
                    cfg.num_heads,
                    cfg.rank,
                    total,
                    packed.sizes[0],
                    int(memory.separate_forget_gate),
                ),
                columns={name: (c.start, c.stop - c.start) for name, c in packed.columns.items()},
                packed=packed,
            )
        )
    return DecodePlan(library, carrier, steps)
