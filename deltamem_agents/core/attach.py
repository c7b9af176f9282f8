"""attach_memory / detach_memory: add δ-mem to a loaded transformers causal LM in place.

Nothing of the backbone is replaced: each attention module gets a child ``deltamem`` (a MemoryLayer), the
decoder gets two hooks, and each corrected projection gets an instance ``forward`` (a CorrectedForward: its own
forward plus the correction); ``detach_memory`` removes all three, so the original modules are exactly as before.

Per forward call:
  decoder pre-hook   -> find the cache's carrier, the current tokens' padding mask; open a CallContext
  q_proj forward     -> q_proj(x) + correction, where corrections, new state = memory(x, state, writes, mask,
                        segment_ids) runs once per layer (x = q_proj's input = the attention input; the q
                        correction lands before q-norm and RoPE, which run after q_proj)
  (k, v forwards     -> + their corrections, with ``corrections="qkvo"``)
  o_proj forward     -> o_proj(attention) + correction
  decoder post-hook  -> close the CallContext (also on exceptions)

Public helpers for code that drives the decoder itself (training, evaluation): :func:`decoder_of`,
:func:`attention_modules`.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from deltamem_agents.core.backbones import BackboneSpec, attention_shapes, backbone_spec, projection_weights, resolve
from deltamem_agents.core.carrier import CURRENT_CALL, CallContext, MemoryCarrier, carrier_of
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.core.decode_plan import plan_for
from deltamem_agents.core.errors import AdapterError, ConfigError
from deltamem_agents.core.fingerprint import Fingerprinter
from deltamem_agents.core.memory_layer import MemoryLayer

MEMORY_MODULE_NAME = "deltamem"
PARAMETER_MARKER = f".{MEMORY_MODULE_NAME}."
ATTACHMENT_ATTRIBUTE = "_deltamem_attachment"
CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache


@dataclass
class Attachment:
    """Bookkeeping of memory attached to one model (stored on the model, no tensors of its own)."""

    config: DeltaMemConfig
    spec: BackboneSpec
    layers: tuple[int, ...]
    modules: list[MemoryLayer]
    handles: list = field(default_factory=list)
    patched: list = field(default_factory=list)  # projection modules whose forward is a CorrectedForward
    requires_grad_before: dict[str, bool] = field(default_factory=dict)
    fingerprinter: Fingerprinter = field(default_factory=Fingerprinter)

    def device(self, model: nn.Module) -> torch.device:
        return self.modules[0].memory_q_proj.device

    def fingerprint(self, model: nn.Module) -> str:
        """The fingerprint of the states this adapter writes on this backbone (see ``core.fingerprint``)."""
        memory = {
            f"layers.{index}.{name}": param
            for index, module in zip(self.layers, self.modules)
            for name, param in module.named_parameters()
        }
        return self.fingerprinter.fingerprint(model, self.config, memory)


def attachment_of(model: nn.Module) -> Attachment:
    """The Attachment of ``model``; raises AdapterError when no memory is attached."""
    attachment = getattr(model, ATTACHMENT_ATTRIBUTE, None)
    if attachment is None:
        raise AdapterError("this model has no δ-mem memory attached: call attach_memory(model, config) first")
    return attachment


def has_memory(model: nn.Module) -> bool:
    return getattr(model, ATTACHMENT_ATTRIBUTE, None) is not None


def attach_memory(model: nn.Module, config: DeltaMemConfig | None = None, dtype: torch.dtype = torch.float32):
    """Attach δ-mem to every (or the configured) attention layer of ``model``, in place, and freeze the backbone.

    Args:
        model: a transformers causal LM of a supported family (see ``deltamem_agents.core.backbones``).
        config: the adapter configuration (defaults to ``DeltaMemConfig()``: TSW, r = 8, Q/O corrections).
        dtype: dtype of the memory parameters (float32 by default, also under a bf16 backbone).

    Returns:
        The model, now with memory; only parameters whose name contains ``.deltamem.`` require grad.
    """
    config = config or DeltaMemConfig()
    if has_memory(model):
        raise AdapterError("this model already has δ-mem attached; call detach_memory(model) first")
    spec = backbone_spec(model)
    total = _num_layers(model, spec)
    layers = config.layers if config.layers is not None else tuple(range(total))
    if max(layers) >= total:
        raise ConfigError(f"DeltaMemConfig.layers: index {max(layers)} is out of range for {total} layers")
    attachment = Attachment(config=config, spec=spec, layers=tuple(layers), modules=[])
    attachment.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    for position, index in enumerate(layers):
        attention = _attention(model, spec, index)
        seed = config.init_seed * 100_003 + index  # a different, reproducible draw per layer
        memory = MemoryLayer(config, attention_shapes(spec, attention), seed=seed).to(device=device, dtype=dtype)
        memory.init_corrections(projection_weights(spec, attention))
        attention.add_module(MEMORY_MODULE_NAME, memory)
        attachment.modules.append(memory)
        attachment.patched += _patch_attention(attention, memory, spec, position)
    decoder = resolve(model, spec.base_model)
    attachment.handles.append(decoder.register_forward_pre_hook(_decoder_pre_hook(attachment, model), with_kwargs=True))
    attachment.handles.append(decoder.register_forward_hook(_decoder_post_hook, always_call=True))
    setattr(model, ATTACHMENT_ATTRIBUTE, attachment)
    for name, param in model.named_parameters():
        param.requires_grad_(PARAMETER_MARKER in f".{name}")
    return model


def detach_memory(model: nn.Module) -> nn.Module:
    """Remove δ-mem from ``model``: hooks, memory modules, and the freeze (requires_grad as before attach)."""
    attachment = attachment_of(model)
    try:
        for handle in attachment.handles:
            handle.remove()
        for module in attachment.patched:
            _unpatch(module)
    finally:
        for index in attachment.layers:
            attention = _attention(model, attachment.spec, index)
            if MEMORY_MODULE_NAME in attention._modules:
                del attention._modules[MEMORY_MODULE_NAME]
        delattr(model, ATTACHMENT_ATTRIBUTE)
        for name, param in model.named_parameters():
            param.requires_grad_(attachment.requires_grad_before.get(name, param.requires_grad))
    return model


def memory_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters keyed ``layers.{i}.{name}`` (i = backbone layer index)."""
    attachment = attachment_of(model)
    return {
        f"layers.{index}.{name}": param
        for index, module in zip(attachment.layers, attachment.modules)
        for name, param in module.named_parameters()
    }


def decoder_of(model: nn.Module) -> nn.Module:
    """The base decoder of a supported causal LM, without the LM head (e.g. ``model.model`` for llama).

    Calling it with a DeltaMemCache reads and writes the memory like ``model(...)`` but skips the vocabulary
    projection: what a write pass needs."""
    return resolve(model, backbone_spec(model).base_model)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that carry memory, in layer order (``module.deltamem`` is each one's MemoryLayer)."""
    attachment = attachment_of(model)
    return [_attention(model, attachment.spec, index) for index in attachment.layers]


def _num_layers(model: nn.Module, spec: BackboneSpec) -> int:
    return len(resolve(model, spec.layers))


def _attention(model: nn.Module, spec: BackboneSpec, index: int) -> nn.Module:
    return getattr(resolve(model, spec.layers)[index], spec.attention)


def _decoder_pre_hook(attachment: Attachment, model: nn.Module):
    num_layers = len(attachment.layers)
    fusable = attachment.spec.fused_qkv is None  # the decode plan adds whole projection outputs

    def hook(module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        length = tokens.shape[1] if tokens is not None else None
        cache_key = next((key for key in CACHE_KWARGS if kwargs.get(key) is not None), None)
        use_cache = kwargs.get("use_cache")
        use_cache = model.config.use_cache if use_cache is None else use_cache
        if cache_key is None and use_cache:
            # Create the cache the decoder would have created, so the memory rides on it and can be returned.
            kwargs[CACHE_KWARGS[0]] = DynamicCache(config=model.config)
            cache_key = CACHE_KWARGS[0]
        if cache_key is not None:
            carrier = carrier_of(kwargs[cache_key], num_layers)
        else:
            carrier = MemoryCarrier(states=[None] * num_layers)  # no cache: this call starts from zero
        mask = kwargs.get("attention_mask")
        mask = mask[:, -length:].to(torch.bool) if mask is not None and mask.dim() == 2 and length else None
        if mask is not None and bool(mask.all()):
            mask = None
        segment_ids, carrier.segment_ids = carrier.segment_ids, None
        if segment_ids is not None and length is not None and segment_ids.shape[-1] != length:
            raise ConfigError(
                f"segment_ids cover {segment_ids.shape[-1]} tokens but this forward call has {length}; give "
                "one message id per input token of the next call"
            )
        context = CallContext(carrier=carrier, mask=mask, segment_ids=segment_ids)
        if fusable and tokens is not None and segment_ids is None:
            # one decoding token: every layer's bookkeeping once, here (see core.decode_plan)
            dtype = attachment.patched[0].weight.dtype
            context.plan = plan_for(attachment.modules, carrier, tokens.shape[0], length, mask is not None, dtype)
        context.token = CURRENT_CALL.set(context)
        return args, kwargs

    return hook


def _decoder_post_hook(module, args, output):
    context = CURRENT_CALL.get()
    if context is not None:
        CURRENT_CALL.reset(context.token)


class CorrectedForward:
    """The ``forward`` of a corrected projection while memory is attached: the projection's own forward, then
    plus this layer's correction. Set as an instance attribute of the projection module (no module or parameter
    is replaced, no hook dispatch per projection); :func:`detach_memory` deletes it, restoring the module.

    The first input projection of a layer (q_proj, or gpt2's fused c_attn) sees x, the attention input: it runs
    the layer's memory once (``MemoryLayer.forward``) and leaves the other corrections in the call's context for
    k/v (qkvo) and o_proj, which pops them.

    Args:
        module: the projection (an ``nn.Linear`` or gpt2 ``Conv1D``).
        memory: the layer's MemoryLayer; position: its index among the memory layers.
        names: the corrections this forward adds (``("q",)``, ``("o",)``, or q/k/v slices of a fused projection).
        columns: per name, the output columns it lands in (fused q/k/v), else None (the whole output).
        computes: whether this projection runs the memory (the first input projection of the layer).
        pops: whether this projection is the layer's last user of the corrections (o_proj).
    """

    def __init__(self, module, memory, position, names, columns, computes, pops):
        self.module, self.memory, self.position = module, memory, position
        self.names, self.columns, self.computes, self.pops = names, columns, computes, pops
        self.previous = module.__dict__.get("forward")  # an instance forward set by someone else (accelerate)
        self.class_forward = type(module).forward

    def __call__(self, x, *args, **kwargs):
        if self.previous is None:  # the projection's own forward
            output = self.class_forward(self.module, x, *args, **kwargs)  # (B, T, out)
        else:
            output = self.previous(x, *args, **kwargs)
        context = CURRENT_CALL.get()
        if context is None:
            return output  # called outside its decoder: behave as the plain backbone
        plan = context.plan
        if plan is not None:  # one decoding token with the fused CPU kernel (core.decode_plan)
            if self.computes:
                return plan.first(self.position, x, output)
            return plan.add(self.position, self.names[0], output)
        if self.computes:
            carrier = context.carrier
            state = _state_for(carrier, self.position, x, self.memory)  # (B, H, r, r) or None
            if state is None:
                return output  # empty memory, no writes: every read is exactly 0
            deltas, carrier.states[self.position] = self.memory(
                x, state, carrier.writes, context.mask, context.segment_ids
            )  # {name: (B, T, out)}, (B, H, r, r)
            context.deltas[self.position] = deltas
        else:
            deltas = context.deltas.pop(self.position, None) if self.pops else context.deltas.get(self.position)
            if deltas is None:
                return output
        for name, columns in zip(self.names, self.columns):
            if columns is None:
                output = deltas.add_to(name, output)  # (B, T, out), one addmm
            else:
                delta = deltas[name].to(output.dtype)  # (B, T, out)
                output = torch.cat(
                    [output[..., : columns.start], output[..., columns] + delta, output[..., columns.stop :]], -1
                )
        return output


def _patch_attention(attention: nn.Module, memory: MemoryLayer, spec: BackboneSpec, position: int) -> list:
    """Set the CorrectedForward of each corrected projection of one attention module; returns the patched
    modules in order, for :func:`_unpatch`."""
    names = memory.corrected
    patches = []
    if spec.fused_qkv is not None:
        width = projection_weights(spec, attention)["q"].shape[0]
        chosen = [(name, slice(slot * width, (slot + 1) * width)) for slot, name in enumerate("qkv") if name in names]
        patches.append((getattr(attention, spec.fused_qkv), tuple(n for n, _ in chosen), tuple(c for _, c in chosen)))
    else:
        for name in ("q", "k", "v"):
            if name in names:
                patches.append((getattr(attention, getattr(spec, name)), (name,), (None,)))
    patches.append((getattr(attention, spec.o), ("o",), (None,)))
    patched = []
    for slot, (module, chosen, columns) in enumerate(patches):
        last = slot == len(patches) - 1
        module.forward = CorrectedForward(module, memory, position, chosen, columns, slot == 0, last)
        patched.append(module)
    return patched


def _unpatch(module: nn.Module) -> None:
    """Restore a projection patched by :func:`_patch_attention` to exactly its previous ``forward``."""
    patch = module.__dict__.get("forward")
    if not isinstance(patch, CorrectedForward):
        return
    if patch.previous is None:
        del module.forward
    else:
        module.forward = patch.previous


def _state_for(carrier: MemoryCarrier, position: int, x: torch.Tensor, memory: MemoryLayer) -> torch.Tensor | None:
    """The state this call starts from ``(B, H, r, r)``: the carrier's (batch 1 expanded to B when writing), zeros
    when it is empty and writes are on, or None when it is empty and writes are off (every read would be 0)."""
    state = carrier.states[position]
    if state is None:
        if not carrier.writes:
            return None
        cfg = memory.config
        return x.new_zeros(x.shape[0], cfg.num_heads, cfg.rank, cfg.rank, dtype=torch.float32)
    if state.shape[0] != x.shape[0] and (carrier.writes or state.shape[0] != 1):  # reads broadcast batch 1
        if state.shape[0] != 1:
            raise ConfigError(f"memory state has batch {state.shape[0]} but the input has batch {x.shape[0]}")
        state = state.expand(x.shape[0], -1, -1, -1)
    return state
