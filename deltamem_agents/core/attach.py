"""attach_memory / detach_memory: add δ-mem to a loaded transformers causal LM in place, with hooks.

Nothing of the backbone is replaced: each attention module gets a child ``deltamem`` (a MemoryLayer) and
forward hooks; ``detach_memory`` removes both, so the original modules are exactly as before.

Per forward call:
  decoder pre-hook   -> find the cache's carrier, the current tokens' padding mask; open a CallContext
  attention pre-hook -> corrections, new state = memory(x, state, writes, mask, segment_ids)   (x = attention input)
  q (k, v) hook      -> output + scale * W_dq read        (before q-norm and RoPE, which run after q_proj)
  o hook             -> output + scale * W_do read
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
        attachment.handles += _hook_attention(attention, memory, spec, position)
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
        context.token = CURRENT_CALL.set(context)
        return args, kwargs

    return hook


def _decoder_post_hook(module, args, output):
    context = CURRENT_CALL.get()
    if context is not None:
        CURRENT_CALL.reset(context.token)


def _hook_attention(attention: nn.Module, memory: MemoryLayer, spec: BackboneSpec, position: int) -> list:
    def pre_hook(module, args, kwargs):
        context = CURRENT_CALL.get()
        if context is None:
            return None  # attention called outside its decoder: behave as the plain backbone
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, d)
        carrier = context.carrier
        state = _state_for(carrier, position, x, memory)  # (B, H, r, r) or None
        if state is None:
            return None  # empty memory, no writes: every read is exactly 0
        context.deltas[position], carrier.states[position] = memory(
            x, state, carrier.writes, context.mask, context.segment_ids
        )  # {name: (B, T, out)}, (B, H, r, r)
        return None

    def post_hook(module, args, output):
        context = CURRENT_CALL.get()
        if context is not None:
            context.deltas.pop(position, None)

    def correct(name: str, columns: slice | None = None):
        def hook(module, args, output):
            context = CURRENT_CALL.get()
            deltas = context.deltas.get(position) if context is not None else None
            if deltas is None:
                return None
            delta = deltas[name].to(output.dtype)  # (B, T, out)
            if columns is None:
                return output + delta
            return torch.cat(
                [output[..., : columns.start], output[..., columns] + delta, output[..., columns.stop :]], -1
            )

        return hook

    handles = [
        attention.register_forward_pre_hook(pre_hook, with_kwargs=True),
        attention.register_forward_hook(post_hook, always_call=True),
    ]
    names = memory.corrected
    if spec.fused_qkv is not None:
        fused = getattr(attention, spec.fused_qkv)
        width = projection_weights(spec, attention)["q"].shape[0]
        for slot, name in enumerate(("q", "k", "v")):
            if name in names:
                columns = slice(slot * width, (slot + 1) * width)
                handles.append(fused.register_forward_hook(correct(name, columns)))
    else:
        for name in ("q", "k", "v"):
            if name in names:
                handles.append(getattr(attention, getattr(spec, name)).register_forward_hook(correct(name)))
    handles.append(getattr(attention, spec.o).register_forward_hook(correct("o")))
    return handles


def _state_for(carrier: MemoryCarrier, position: int, x: torch.Tensor, memory: MemoryLayer) -> torch.Tensor | None:
    """The state this call starts from ``(B, H, r, r)``: the carrier's (batch 1 broadcast to B), zeros when it is
    empty and writes are on, or None when it is empty and writes are off (every read would be 0)."""
    state = carrier.states[position]
    if state is None:
        if not carrier.writes:
            return None
        cfg = memory.config
        return x.new_zeros(x.shape[0], cfg.num_heads, cfg.rank, cfg.rank, dtype=torch.float32)
    if state.shape[0] != x.shape[0]:
        if state.shape[0] != 1:
            raise ConfigError(f"memory state has batch {state.shape[0]} but the input has batch {x.shape[0]}")
        state = state.expand(x.shape[0], -1, -1, -1)
    return state
