"""The one table of architecture quirks: where each supported family keeps its attention projections."""

from dataclasses import dataclass

import torch
from torch import nn

from deltamem_agents.core.errors import UnsupportedModelError


@dataclass(frozen=True)
class BackboneSpec:
    """Where δ-mem hooks into one model family.

    Attributes:
        base_model: attribute of the causal LM holding the decoder (its forward sees the 2D attention mask).
        layers: dotted path from the causal LM to the list of decoder blocks.
        attention: attribute of a block holding self-attention (its input is the normed hidden state x_t).
        q, k, v, o: attribute names of the projections inside the attention module.
        fused_qkv: attribute of a fused q/k/v projection (gpt2's ``c_attn``), else None.
        transposed: projection weights are stored (in, out) (gpt2's Conv1D) instead of nn.Linear's (out, in).
    """

    base_model: str
    layers: str
    attention: str
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    fused_qkv: str | None = None
    transposed: bool = False


_LLAMA_LIKE = BackboneSpec(base_model="model", layers="model.layers", attention="self_attn")

BACKBONES: dict[str, BackboneSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # q_norm runs after q_proj: our q correction lands before it, as the method asks
    "smollm3": _LLAMA_LIKE,
    "gpt2": BackboneSpec(
        base_model="transformer",
        layers="transformer.h",
        attention="attn",
        o="c_proj",
        fused_qkv="c_attn",
        transposed=True,
    ),
}


def backbone_spec(model: nn.Module) -> BackboneSpec:
    """Return the spec for ``model.config.model_type`` or raise UnsupportedModelError listing what is."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BACKBONES:
        raise UnsupportedModelError(
            f"δ-mem does not support model_type {model_type!r}; supported types: {', '.join(sorted(BACKBONES))}. "
            "Add a BackboneSpec for it in deltamem_agents/core/backbones.py if its attention has separate or fused "
            "q/k/v projections and an output projection."
        )
    return BACKBONES[model_type]


def resolve(root: nn.Module, dotted: str):
    """Follow a dotted attribute path from ``root``."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class AttentionShapes:
    """Feature sizes of one attention module's projections."""

    hidden: int
    q_out: int
    k_out: int
    v_out: int
    o_out: int


def projection_weights(spec: BackboneSpec, attention: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen q/k/v/o weights of one attention module as (out, in) matrices (views, no copies)."""
    if spec.fused_qkv is not None:
        fused = getattr(attention, spec.fused_qkv).weight  # (d, 3d) for Conv1D
        fused = fused.t() if spec.transposed else fused  # (3d, d)
        q_w, k_w, v_w = fused.chunk(3, dim=0)  # each (d, d)
    else:
        q_w, k_w, v_w = (getattr(attention, name).weight for name in (spec.q, spec.k, spec.v))
    o_w = getattr(attention, spec.o).weight
    o_w = o_w.t() if spec.transposed else o_w  # (o_out, o_in)
    return {"q": q_w, "k": k_w, "v": v_w, "o": o_w}


def attention_shapes(spec: BackboneSpec, attention: nn.Module) -> AttentionShapes:
    """Sizes read off the projection weights of one attention module."""
    w = projection_weights(spec, attention)
    return AttentionShapes(
        hidden=w["q"].shape[1],
        q_out=w["q"].shape[0],
        k_out=w["k"].shape[0],
        v_out=w["v"].shape[0],
        o_out=w["o"].shape[0],
    )
