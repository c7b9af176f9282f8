"""The training objective of one batch: write pass over the history, read pass over question + answer with the
right memory and (for the control and the contrastive term) another conversation's memory."""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltamem_agents.core.attach import attachment_of, attention_modules, decoder_of
from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.serving import write_schedule
from deltamem_agents.train.batching import IGNORE, Batch
from deltamem_agents.train.write_cache import cached_write_pass


@dataclass
class LossParts:
    """The loss of one batch and what the progress bar shows. ``gap`` = CE(wrong memory) - CE(right memory)."""

    loss: torch.Tensor
    ce: float
    ce_wrong: float | None
    gate: float
    beta_mean: float
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    teacher_seconds: float = 0.0
    distill: float | None = None

    @property
    def gap(self) -> float | None:
        return None if self.ce_wrong is None else self.ce_wrong - self.ce


def write_pass(model, batch: Batch, detach_backbone: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Write the histories into fresh memories through the write schedule (the chat's write path).

    Returns ``(states, betas)``: per memory layer the final state (B, H, r, r) with autograd graph to the memory
    parameters, and the mean write gate (scalar) over the real tokens.

    With ``detach_backbone`` the backbone runs without graph; each layer's state is then recomputed from that
    layer's (detached) attention inputs, call by call, so gradients reach the memory projections and gates
    through the state but not through the backbone's earlier layers (cheaper; the paper backpropagates through
    everything). The forward values are the same either way.
    """
    attachment = attachment_of(model)
    cfg = attachment.config
    device = attachment.device(model)
    empty = [torch.zeros(batch.size, cfg.num_heads, cfg.rank, cfg.rank, device=device) for _ in attachment.modules]
    inputs: list[list[torch.Tensor]] = [[] for _ in attachment.modules]  # per layer, per call: (B', T, d)
    handles = []
    for position, attention in enumerate(attention_modules(model)):

        def capture(mod, args, kwargs, position=position):
            inputs[position].append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles.append(attention.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_backbone):
            states = write_schedule.run_write_calls(model, list(batch.write_calls), empty)
    finally:
        for handle in handles:
            handle.remove()
    if detach_backbone:
        states = [
            _rewrite_layer(module, batch.write_calls, [x.detach() for x in inputs[position]], empty[position])
            for position, module in enumerate(attachment.modules)
        ]
    betas = []
    for position, module in enumerate(attachment.modules):
        total, count = 0.0, 0.0
        for call, x in zip(batch.write_calls, inputs[position]):
            beta = module.gates(x)[0].flatten(2)  # (B', T, R)
            real = call.mask.to(device=beta.device, dtype=beta.dtype)[:, :, None]  # (B', T, 1)
            total = total + (beta * real).sum()
            count = count + float(real.sum()) * beta.shape[-1]
        betas.append(total / max(count, 1.0) if count else torch.zeros((), device=device))
    return states, betas


def _rewrite_layer(module, calls, inputs: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """One layer's state after ``calls``, recomputed from its recorded attention inputs: ``(B, H, r, r)``."""
    state = empty
    for call, x in zip(calls, inputs):
        rows, mask = call.rows.to(state.device), call.mask.to(state.device)
        segments = torch.where(mask, 0, -1) if module.config.write == "segment" else None  # (B', T)
        padded = None if bool(mask.all()) else mask
        _, after = module.read_write(x, state.index_select(0, rows), True, mask=padded, segment_ids=segments)
        state = state.index_copy(0, rows, after)
    return state


def answer_logits(model, batch: Batch, states: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The logits at the answer positions, reading ``states`` with writes off: ``(logits (N, V), targets (N,),
    rows (N,) the example of each answer token, first (N,) true at each example's first answer token)``."""
    cache = DeltaMemCache.from_states(model, states, writes=False)
    hidden = decoder_of(model)(
        input_ids=batch.read_ids, attention_mask=batch.read_mask.long(), cache=cache, use_cache=True
    ).last_hidden_state  # (B, T, d)
    targets = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][where])  # (N, V), only answer positions
    rows = where.nonzero()[:, 0]  # (N,) example of each answer token
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # (N,)
    return logits, targets[where], rows, first


def first_token_hits(model, batch: Batch, states: list[torch.Tensor]) -> torch.Tensor:
    """Per example whether the argmax at the first answer position is the answer's first token: (B,) bool."""
    return _first_hits(batch.size, *answer_logits(model, batch, states))


def answer_scores(model, batch: Batch, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`answer_losses` (plain mean) and :func:`first_token_hits` from one read pass: ``(B,), (B,) bool``."""
    logits, targets, rows, first = answer_logits(model, batch, states)
    return _per_example_ce(batch.size, logits, targets, rows, first), _first_hits(
        batch.size, logits, targets, rows, first
    )


def _first_hits(size: int, logits, targets, rows, first) -> torch.Tensor:
    """Per example whether the argmax at its first answer position is its first answer token: (B,) bool."""
    hits = torch.zeros(size, dtype=torch.bool, device=logits.device)
    return hits.index_copy(0, rows[first], logits[first].argmax(-1) == targets[first])


def _per_example_ce(size: int, logits, targets, rows, first, first_weight: float = 1.0) -> torch.Tensor:
    """Per example the answer tokens' cross-entropy, mean weighted ``first_weight`` at the first token: (B,)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    weights = torch.where(first, first_weight, 1.0).to(ce.dtype)  # (N,)
    per_example = torch.zeros(size, device=ce.device).index_add(0, rows, ce * weights)
    totals = torch.zeros(size, device=ce.device).index_add(0, rows, weights)
    return per_example / totals.clamp_min(1e-12)  # (B,)


def answer_losses(
    model, batch: Batch, states: list[torch.Tensor], keep: list | None = None, first_weight: float = 1.0
) -> torch.Tensor:
    """Per-example weighted mean cross-entropy on the answer tokens, reading ``states`` with writes off: (B,).

    Each example's first answer token weighs ``first_weight``, the others 1 (1 = the plain mean; the first
    token is where a closed-set value is decided). ``keep``: a list that receives ``(logits (N, V), rows (N,))``
    of the answer positions (for distillation)."""
    logits, targets, rows, first = answer_logits(model, batch, states)
    if keep is not None:
        keep.append((logits, rows))
    return _per_example_ce(batch.size, logits, targets, rows, first, first_weight)  # (B,)


def batch_loss(
    model,
    batch: Batch,
    detach_backbone: bool = False,
    gate_weight: float = 0.01,
    gate_target: float = 0.05,
    contrastive_weight: float = 0.0,
    margin: float = 1.0,
    control: bool = True,
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
    prompt_weight: float = 1.0,
    distill_weight: float = 0.0,
    distill_top_k: int = 64,
    first_weight: float = 1.0,
) -> LossParts:
    """The training loss of one batch.

    loss = CE(answer | right memory) + gate_weight * mean_layers (mean beta - gate_target)^2
           + contrastive_weight * mean relu(margin + CE(right) - CE(wrong))
    where "wrong" reads the memory of the next conversation in the batch (rolled by one). For the examples whose
    read prompt holds the answer (``batch.in_prompt``) the margin is replaced by ``prompt_weight * CE(wrong)``:
    there the model must answer from the prompt whichever memory it reads. With ``distill_weight`` (needs
    ``batch.teacher``) it adds ``distill_weight * KL(teacher || student)`` per answer token, mean over tokens:
    the teacher is the frozen backbone (empty memory) reading the prompt WITH the fact-holding messages, the
    student the right memory reading the prompt without them; both over the teacher's top ``distill_top_k``
    tokens, renormalised (see :func:`distillation_kl`). The wrong-memory CE is
    computed whenever the batch has 2+ examples and ``control`` or the contrastive term asks for it; it is the
    control gap shown during training.

    ``cached``: ``(means, mask)`` of :meth:`~deltamem_agents.train.write_cache.MessageInputCache.stack`: the write
    pass runs from the cached per-message inputs (``write_cache.cached_write_pass``) instead of the backbone.
    """
    tick = time.perf_counter()
    if cached is not None:
        states, betas = cached_write_pass(model, *cached)
    else:
        states, betas = write_pass(model, batch, detach_backbone)
    keep: list = []
    write_seconds = time.perf_counter() - tick
    gate = torch.stack([(b - gate_target) ** 2 for b in betas]).mean()
    use_wrong = batch.size > 1 and (control or contrastive_weight > 0)
    if use_wrong:
        both = batch.reads_twice()
        wrong = [s.roll(1, dims=0) for s in states]
        if contrastive_weight == 0:
            wrong = [s.detach() for s in wrong]
        ce_all = answer_losses(
            model, both, [torch.cat([s, w]) for s, w in zip(states, wrong)], keep, first_weight
        )  # (2B,)
        ce, ce_wrong = ce_all[: batch.size], ce_all[batch.size :]
        if contrastive_weight == 0:
            ce_wrong = ce_wrong.detach()
    else:
        ce, ce_wrong = answer_losses(model, batch, states, keep, first_weight), None
    loss = ce.mean() + gate_weight * gate
    read_seconds = time.perf_counter() - tick - write_seconds
    teacher_seconds, distill = 0.0, None
    if distill_weight > 0:
        if batch.teacher is None:
            raise ValueError("distillation needs the teacher's read tensors: encode the examples with teacher=True")
        teacher_tick = time.perf_counter()
        with torch.no_grad():
            zeros = [torch.zeros_like(s) for s in states]  # the empty memory reads 0: the frozen backbone
            teacher_logits, _, _, _ = answer_logits(model, batch.teacher, zeros)  # (N, V)
        teacher_seconds = time.perf_counter() - teacher_tick
        student_logits, rows = keep[0]
        student_logits = student_logits[rows < batch.size]  # the right-memory read's answer tokens, in order
        distill = distillation_kl(teacher_logits, student_logits, distill_top_k).mean()
        loss = loss + distill_weight * distill
    if contrastive_weight > 0 and ce_wrong is not None:
        in_prompt = batch.in_prompt if batch.in_prompt is not None else torch.zeros_like(ce, dtype=torch.bool)
        hinge = F.relu(margin + ce - ce_wrong)  # (B,)
        free = (~in_prompt).to(ce.dtype)  # (B,) the memory is the only source of the answer
        loss = loss + contrastive_weight * (hinge * free).sum() / ce.shape[0]
        loss = loss + prompt_weight * (ce_wrong * in_prompt.to(ce.dtype)).sum() / ce.shape[0]
    return LossParts(
        loss=loss,
        ce=float(ce.detach().mean()),
        ce_wrong=None if ce_wrong is None else float(ce_wrong.detach().mean()),
        gate=float(gate.detach()),
        beta_mean=float(torch.stack(betas).detach().mean()),
        write_seconds=write_seconds,
        read_seconds=read_seconds,
        teacher_seconds=teacher_seconds,
        distill=None if distill is None else float(distill.detach()),
    )


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_k: int = 64) -> torch.Tensor:
    """Per answer token ``KL(p_teacher || p_student)`` over the teacher's top ``top_k`` tokens, both distributions
    renormalised over those tokens: ``(N, V), (N, V) -> (N,)``."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student answer positions differ: {teacher_logits.shape} vs {student_logits.shape}"
        )
    top = teacher_logits.float().topk(min(top_k, teacher_logits.shape[-1]), dim=-1)  # (N, k)
    log_p = F.log_softmax(top.values, dim=-1)  # (N, k)
    log_q = F.log_softmax(student_logits.float().gather(-1, top.indices), dim=-1)  # (N, k)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
