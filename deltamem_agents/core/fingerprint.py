"""The fingerprint every MemoryState carries: which adapter on which backbone wrote it.

fingerprint = sha256 of
  - the config fields that define the math (``MATH_FIELDS``: rank, alpha, write strategy, number of states,
    layers, which corrections, forget-gate form) — not the speed settings (``SPEED_FIELDS``) and not the init
    settings (gate and correction inits matter only through the weights, which are hashed as trained);
  - every memory parameter, by name;
  - a digest of ALL backbone weights (the memory reads every layer's input and feeds every later layer), computed
    once per loaded model and recomputed only when a weight tensor is replaced or changed in place.
A state is refused by a model whose fingerprint differs, so a speed knob never makes stored states unreadable,
and another fine-tune or a merged LoRA of the same architecture is detected.
"""

import hashlib
import json

import torch
from torch import nn

from deltamem_agents.core.config import DeltaMemConfig

MATH_FIELDS = ("rank", "alpha", "write", "num_states", "layers", "corrections", "forget_gate")
SPEED_FIELDS = ("chunk_size",)  # also speed, outside the config: kernel switches, thresholds, piece size, threads
MEMORY_MARKER = ".deltamem."


def math_config(config: DeltaMemConfig) -> dict:
    """The config fields that change what a state means (see the module docstring)."""
    values = config.model_dump(mode="json")
    return {name: values[name] for name in MATH_FIELDS}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype


def _version_key(params: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, p.data_ptr(), p._version) for name, p in params)


class Fingerprinter:
    """Computes and caches one model's fingerprint; the backbone digest is recomputed only after a backbone
    weight changes (its data pointer or in-place version counter moves), the rest after a memory weight does."""

    def __init__(self):
        self._backbone_key = None
        self._backbone_digest = ""
        self._key = None
        self._fingerprint = ""

    def backbone_digest(self, model: nn.Module) -> str:
        """sha256 over every backbone parameter (name, dtype, shape, bytes), memory parameters excluded."""
        params = [(n, p) for n, p in model.named_parameters() if MEMORY_MARKER not in f".{n}."]
        key = _version_key(params)
        if key != self._backbone_key:
            digest = hashlib.sha256()
            for name, param in params:
                digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
                digest.update(_tensor_bytes(param))
            self._backbone_key, self._backbone_digest = key, digest.hexdigest()
        return self._backbone_digest

    def fingerprint(self, model: nn.Module, config: DeltaMemConfig, memory: dict[str, torch.Tensor]) -> str:
        """The 16-hex-digit fingerprint of ``memory`` (name -> parameter) under ``config`` on ``model``."""
        backbone = self.backbone_digest(model)
        items = sorted(memory.items())
        key = (backbone, json.dumps(math_config(config), sort_keys=True), _version_key(items))
        if key != self._key:
            digest = hashlib.sha256()
            digest.update(json.dumps([math_config(config), model.config.model_type, backbone], sort_keys=True).encode())
            for name, tensor in items:
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor.float()))
            self._key, self._fingerprint = key, digest.hexdigest()[:16]
        return self._fingerprint
