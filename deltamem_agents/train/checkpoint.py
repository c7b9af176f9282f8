"""Resumable training checkpoints without pickle: one folder holding the adapter (our adapter format), the
optimizer moments (safetensors), the RNG states (safetensors / JSON) and the trainer state (JSON: step,
schedule, metrics history). The folder is replaced atomically: a kill at any moment leaves either the old or
the new checkpoint complete."""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltamem_agents.core.adapter import load_adapter, save_adapter
from deltamem_agents.core.attach import memory_parameters
from deltamem_agents.core.errors import DeltaMemError

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointError(DeltaMemError):
    """A training checkpoint is missing, incomplete or does not fit the run."""


def save_checkpoint(directory, model, optimizer: torch.optim.Optimizer, state: dict, adapter_extra: dict) -> Path:
    """Write a complete checkpoint to ``directory`` (replacing it atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
    try:
        save_adapter(model, staging, extra=adapter_extra)
        save_file(_optimizer_tensors(model, optimizer), str(staging / OPTIMIZER_FILE))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(staging / RNG_FILE))
        state = {**state, "python_rng": _jsonable(random.getstate())}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def has_checkpoint(directory) -> bool:
    """Whether ``directory`` (or the backup a kill mid-replace can leave) holds a complete checkpoint."""
    return _complete(Path(directory)) or _complete(_backup(Path(directory)))


def load_checkpoint(directory, model, optimizer: torch.optim.Optimizer) -> dict:
    """Restore adapter weights, optimizer moments and RNG states; returns the trainer state dict."""
    directory = Path(directory)
    if not _complete(directory):
        if _complete(_backup(directory)):
            directory = _backup(directory)
        else:
            raise CheckpointError(f"no complete training checkpoint at {directory}")
    load_adapter(model, directory)
    _load_optimizer(model, optimizer, load_file(str(directory / OPTIMIZER_FILE)))
    rng = load_file(str(directory / RNG_FILE))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((directory / STATE_FILE).read_text())
    random.setstate(_tuples(state.pop("python_rng")))
    return state


def _backup(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in (OPTIMIZER_FILE, RNG_FILE, STATE_FILE, "adapter.safetensors"))


def _optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments keyed ``{param name}.{exp_avg|exp_avg_sq|step}``."""
    tensors = {}
    for name, param in memory_parameters(model).items():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    return tensors


def _load_optimizer(model, optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for name, param in memory_parameters(model).items():
        keys = [k for k in tensors if k.rsplit(".", 1)[0] == name]
        if not keys:
            continue
        optimizer.state[param] = {k.rsplit(".", 1)[1]: tensors[k].to(param.device) for k in keys}
        if "step" in optimizer.state[param]:
            optimizer.state[param]["step"] = optimizer.state[param]["step"].float().cpu()


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
