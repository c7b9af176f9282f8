"""A tool-choice adapter: low-rank (LoRA) deltas on a backbone's attention projections, active only while the
likelihood tool choice scores the actions (``serving.tool_choice.listed_scores``).

Replies, tool arguments, the memory's write and read passes never see it: the backbone's weights are not
changed, so memory states and their fingerprints are exactly those of the backbone with its memory adapter, and
decoding is as fast as without it. Only the few scoring forwards of a turn run with it.

    delta(x) = scale * B(A(x)),   A: (rank, in), B: (out, rank), scale = alpha / rank

added to each adapted projection's output through a forward hook while :meth:`ChoiceAdapter.active` is entered.
:meth:`ChoiceAdapter.merged_weight` is the naive reference (W + scale * B @ A) the tests compare the hooks with.

Files: ``choice_adapter.safetensors`` (the A and B matrices, by projection name) and ``choice_adapter.json``
(rank, alpha, targets, backbone, the training command and its numbers). Nothing is unpickled.
"""

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltamem_agents.core.errors import AdapterError

WEIGHTS_FILE = "choice_adapter.safetensors"
CONFIG_FILE = "choice_adapter.json"
DEFAULT_TARGETS = ("q_proj", "v_proj", "o_proj")


class ChoiceAdapter(nn.Module):
    """LoRA matrices for every ``nn.Linear`` of ``model`` whose name ends in one of ``targets``.

    Args:
        model: the backbone (with or without memory attached; projections are found by name).
        rank, alpha: the low rank and the scale numerator (scale = alpha / rank).
        targets: projection names to adapt (the last part of the module name).
        info: free metadata saved beside the weights (backbone name, training command, numbers).
    """

    def __init__(self, model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS, info=None):
        super().__init__()
        self.rank, self.alpha, self.targets = rank, float(alpha), tuple(targets)
        self.info = dict(info or {})
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
        if not self.names:
            raise AdapterError(f"no linear projection named one of {list(targets)} in this model")
        modules = dict(model.named_modules())
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name in self.names:
            linear = modules[name]
            key = _key(name)
            down = torch.empty(rank, linear.in_features)  # (r, in)
            nn.init.kaiming_uniform_(down, a=5**0.5)
            self.down[key] = nn.Parameter(down)
            self.up[key] = nn.Parameter(torch.zeros(linear.out_features, rank))  # (out, r): starts as identity
        self._lock = threading.RLock()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scale * B(A(x))`` of projection ``name``; x: (..., in) -> (..., out)."""
        key = _key(name)
        down, up = self.down[key], self.up[key]
        return (x.to(down.dtype) @ down.T @ up.T) * self.scale  # (..., r) -> (..., out)

    @contextmanager
    def active(self, model: nn.Module):
        """Within this block every adapted projection of ``model`` adds its delta (forward hooks, removed on
        exit, also on exceptions). Reentrant per adapter; the engine's lock serialises forwards anyway."""
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise AdapterError(f"this choice adapter adapts {missing[:3]}..., which the model does not have")
        with self._lock:
            handles = []
            try:
                for name in self.names:

                    def hook(module, args, output, name=name):
                        return output + self.delta(name, args[0]).to(output.dtype)

                    handles.append(modules[name].register_forward_hook(hook))
                yield self
            finally:
                for handle in handles:
                    handle.remove()

    def merged_weight(self, model: nn.Module, name: str) -> torch.Tensor:
        """The naive reference: projection ``name``'s weight with the delta merged in, W + scale * B @ A."""
        weight = dict(model.named_modules())[name].weight
        key = _key(name)
        return weight + self.scale * (self.up[key] @ self.down[key]).to(weight.dtype)  # (out, in)

    def fingerprint(self) -> str:
        """sha256 over rank, alpha, targets and every matrix (what the chat's cache key holds)."""
        digest = hashlib.sha256(json.dumps([self.rank, self.alpha, list(self.targets)]).encode())
        for key in sorted(self.down.keys()):
            for tensor in (self.down[key], self.up[key]):
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory) -> Path:
        """Write the weights (safetensors) and the config (JSON) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.down": v.detach().contiguous() for k, v in self.down.items()}
        tensors |= {f"{k}.up": v.detach().contiguous() for k, v in self.up.items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        config = {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def load(cls, directory, model: nn.Module) -> "ChoiceAdapter":
        """Read a saved adapter for ``model``; a clear error when files are missing or do not fit the model."""
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
            raise AdapterError(
                f"{directory} is not a choice adapter: it needs {WEIGHTS_FILE} and {CONFIG_FILE} "
                "(made by scripts/train_choice_adapter.py)"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        adapter = cls(model, config["rank"], config["alpha"], tuple(config["targets"]), config.get("info"))
        tensors = load_file(str(directory / WEIGHTS_FILE))
        expected = {f"{k}.{part}" for k in adapter.down.keys() for part in ("down", "up")}
        if set(tensors) != expected:
            raise AdapterError(
                f"{directory}: the adapter's matrices do not match this model's projections "
                f"({len(set(tensors) ^ expected)} names differ); was it trained for another backbone?"
            )
        with torch.no_grad():
            for key in adapter.down.keys():
                for part, table in (("down", adapter.down), ("up", adapter.up)):
                    saved = tensors[f"{key}.{part}"]
                    if saved.shape != table[key].shape:
                        raise AdapterError(
                            f"{directory}: {key}.{part} has shape {tuple(saved.shape)}, "
                            f"this model needs {tuple(table[key].shape)}"
                        )
                    table[key].copy_(saved)
        adapter.requires_grad_(False)
        return adapter


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots
