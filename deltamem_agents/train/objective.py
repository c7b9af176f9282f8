"""The training objective of one batch: write pass over the history, read pass over question + answer with the
right memory and (for the control and the contrastive term) another conversation's memory."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltamem_agents.core.attach import attachment_of
from deltamem_agents.core.backbones import resolve
from deltamem_agents.core.cache import DeltaMemCache
from deltamem_agents.train.batching import IGNORE, Batch


@dataclass
class LossParts:
    """The loss of one batch and what the progress bar shows. ``gap`` = CE(wrong memory) - CE(right memory)."""

    loss: torch.Tensor
    ce: float
    ce_wrong: float | None
    gate: float
    beta_mean: float

    @property
    def gap(self) -> float | None:
        return None if self.ce_wrong is None else self.ce_wrong - self.ce


def write_pass(model, batch: Batch, detach_backbone: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Write the histories into fresh memories.

    Returns ``(states, betas)``: per memory layer the final state (B, H, r, r) with autograd graph to the memory
    parameters, and the mean write gate (scalar) over the real tokens.

    With ``detach_backbone`` the backbone runs without graph; each layer's state is then recomputed from that
    layer's (detached) attention inputs, so gradients reach the memory projections and gates through the state
    but not through the backbone's earlier layers (cheaper; the paper backpropagates through everything).
    """
    attachment = attachment_of(model)
    decoder = resolve(model, attachment.spec.base_model)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for position in range(len(attachment.modules)):
        attention = module_parent(model, attachment, position)

        def capture(mod, args, kwargs, position=position):
            inputs[position] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)

        handles.append(attention.register_forward_pre_hook(capture, with_kwargs=True))
    cache = DeltaMemCache(model, writes=True)
    mask = batch.write_mask
    try:
        if attachment.config.write == "segment":
            cache.set_segment_ids(batch.write_segments)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_backbone):
            decoder(input_ids=batch.write_ids, attention_mask=mask.long(), cache=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    states, betas = [], []
    token_mask = mask.to(torch.float32)[:, :, None]  # (B, T, 1)
    for position, module in enumerate(attachment.modules):
        x = inputs[position]
        if detach_backbone:
            x = x.detach()
            zero = x.new_zeros(x.shape[0], module.config.num_heads, module.config.rank, module.config.rank)
            _, state = module.read_write(
                x, zero.float(), True, mask=None if bool(mask.all()) else mask, segment_ids=batch.write_segments
            )
        else:
            state = cache.carrier.states[position]
        beta = torch.sigmoid(F.linear(x.to(module.beta_proj.dtype), module.beta_proj, module.beta_bias))  # (B,T,R)
        betas.append((beta * token_mask).sum() / (token_mask.sum() * beta.shape[-1]).clamp_min(1))
        states.append(state)
    return states, betas


def module_parent(model, attachment, position: int):
    from deltamem_agents.core.attach import _attention

    return _attention(model, attachment.spec, attachment.layers[position])


def answer_losses(model, batch: Batch, states: list[torch.Tensor]) -> torch.Tensor:
    """Per-example mean cross-entropy on the answer tokens, reading ``states`` with writes off: (B,)."""
    attachment = attachment_of(model)
    decoder = resolve(model, attachment.spec.base_model)
    cache = DeltaMemCache(model, writes=False)
    cache.carrier.states = list(states)
    hidden = decoder(
        input_ids=batch.read_ids, attention_mask=batch.read_mask.long(), cache=cache, use_cache=True
    ).last_hidden_state  # (B, T, d)
    targets = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][where])  # (N, V), only answer positions
    ce = F.cross_entropy(logits.float(), targets[where], reduction="none")  # (N,)
    rows = where.nonzero()[:, 0]  # (N,) example of each answer token
    per_example = torch.zeros(batch.size, device=ce.device).index_add(0, rows, ce)
    counts = torch.zeros(batch.size, device=ce.device).index_add(0, rows, torch.ones_like(ce))
    return per_example / counts.clamp_min(1)  # (B,)


def batch_loss(
    model,
    batch: Batch,
    detach_backbone: bool = False,
    gate_weight: float = 0.01,
    gate_target: float = 0.05,
    contrastive_weight: float = 0.0,
    margin: float = 1.0,
    control: bool = True,
) -> LossParts:
    """The training loss of one batch.

    loss = CE(answer | right memory) + gate_weight * mean_layers (mean beta - gate_target)^2
           + contrastive_weight * mean relu(margin + CE(right) - CE(wrong))
    where "wrong" reads the memory of the next conversation in the batch (rolled by one). The wrong-memory CE is
    computed whenever the batch has 2+ examples and ``control`` or the contrastive term asks for it; it is the
    control gap shown during training.
    """
    states, betas = write_pass(model, batch, detach_backbone)
    gate = torch.stack([(b - gate_target) ** 2 for b in betas]).mean()
    use_wrong = batch.size > 1 and (control or contrastive_weight > 0)
    if use_wrong:
        both = Batch(*(torch.cat([getattr(batch, f)] * 2) for f in batch.__dataclass_fields__))
        wrong = [s.roll(1, dims=0) for s in states]
        if contrastive_weight == 0:
            wrong = [s.detach() for s in wrong]
        ce_all = answer_losses(model, both, [torch.cat([s, w]) for s, w in zip(states, wrong)])  # (2B,)
        ce, ce_wrong = ce_all[: batch.size], ce_all[batch.size :]
        if contrastive_weight == 0:
            ce_wrong = ce_wrong.detach()
    else:
        ce, ce_wrong = answer_losses(model, batch, states), None
    loss = ce.mean() + gate_weight * gate
    if contrastive_weight > 0 and ce_wrong is not None:
        loss = loss + contrastive_weight * F.relu(margin + ce - ce_wrong).mean()
    return LossParts(
        loss=loss,
        ce=float(ce.detach().mean()),
        ce_wrong=None if ce_wrong is None else float(ce_wrong.detach().mean()),
        gate=float(gate.detach()),
        beta_mean=float(torch.stack(betas).detach().mean()),
    )
