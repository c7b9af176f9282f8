"""Saving, loading and importing δ-mem adapters.

Our format: a folder with ``deltamem_config.json`` (config + backbone description) and ``adapter.safetensors``
(tensors keyed ``layers.{i}.{name}``). The reference implementation's format (``delta_mem_config.json`` +
``delta_mem_adapter.pt``) can be imported; it is the only place we call ``torch.load``, with
``weights_only=True`` so no arbitrary object is ever unpickled.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltamem_agents.core.attach import attach_memory, attachment_of, detach_memory, has_memory, memory_parameters
from deltamem_agents.core.config import DeltaMemConfig
from deltamem_agents.core.errors import AdapterError, ConfigError
from deltamem_agents.core.fingerprint import SPEED_FIELDS, math_config

CONFIG_FILE = "deltamem_config.json"
WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "deltamem-adapter"
REFERENCE_CONFIG_FILE = "delta_mem_config.json"
REFERENCE_WEIGHTS_FILE = "delta_mem_adapter.pt"


def save_adapter(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model's adapter to ``directory`` (created if needed). Files are replaced atomically, so an
    interrupted save leaves the previous adapter intact. ``extra`` is stored in the JSON (e.g. training info)."""
    attachment = attachment_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in memory_parameters(model).items()}
    description = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "config": attachment.config.model_dump(mode="json"),
        "backbone": backbone_description(model),
        "fingerprint": attachment.fingerprint(model),
        "extra": extra or {},
    }
    _atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
    _atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(description, indent=2)))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[DeltaMemConfig, dict]:
    """The config and the whole JSON description of a saved adapter."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"no δ-mem adapter at {directory}: {CONFIG_FILE} is missing")
    try:
        description = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    if description.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path} is not a δ-mem adapter description (format {description.get('format')!r})")
    try:
        return DeltaMemConfig(**description["config"]), description
    except ConfigError as err:
        raise AdapterError(f"{path} holds an invalid config: {err}") from None


def load_adapter(model, directory: str | os.PathLike, **speed):
    """Load a saved adapter into ``model``: attaches memory with the saved config if none is attached (else the
    attached config must define the same math). On any error the model is left as it was.

    ``speed``: speed settings to use instead of the saved ones (``SPEED_FIELDS``, e.g. ``chunk_size=32``); they
    are not part of the state fingerprint, so states written before still load."""
    unknown = sorted(set(speed) - set(SPEED_FIELDS))
    if unknown:
        raise AdapterError(f"load_adapter: {unknown} are not speed settings; only {list(SPEED_FIELDS)} can be changed")
    config, description = read_adapter_config(directory)
    if speed:
        config = DeltaMemConfig(**{**config.model_dump(), **speed})
    expected = description.get("backbone", {})
    actual = backbone_description(model)
    if expected and expected != actual:
        raise AdapterError(f"adapter at {directory} was trained for backbone {expected}, this model is {actual}")
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"cannot read {weights_path}: {err}") from None
    _load_tensors(model, config, tensors, str(weights_path))
    return model


SHIPPED_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"


def export_adapter_files(source: str | os.PathLike, name: str, force: bool = False, into: Path | None = None) -> Path:
    """Copy the adapter files of ``source`` (a training checkpoint or an adapter folder) into
    ``into / name`` (default: the package's ``adapters/``): the weights and the config, nothing else."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise AdapterError(f"adapter name {name!r} must be a folder name: letters, digits, '.', '-', '_'")
    read_adapter_config(source)  # a valid adapter description, or a clear error
    weights = Path(source) / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"no adapter weights at {source}: {WEIGHTS_FILE} is missing")
    target = (into or SHIPPED_ADAPTERS) / name
    if target.exists() and not force:
        raise AdapterError(f"{target} exists; pass --force (force=True) to replace it")
    target.mkdir(parents=True, exist_ok=True)
    for file in (WEIGHTS_FILE, CONFIG_FILE):
        data = (Path(source) / file).read_bytes()
        _atomic_write(target / file, lambda path, data=data: path.write_bytes(data))
    return target


def import_reference_adapter(model, directory: str | os.PathLike):
    """Import an adapter saved by the reference δ-mem code (METHOD.md, "Reference checkpoint format")."""
    directory = Path(directory)
    config_path, weights_path = directory / REFERENCE_CONFIG_FILE, directory / REFERENCE_WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(
            f"a reference adapter needs {REFERENCE_CONFIG_FILE} and {REFERENCE_WEIGHTS_FILE} in {directory}"
        )
    try:
        reference = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from None
    config = config_from_reference(reference)
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)  # the one permitted unpickling
    except Exception as err:  # torch raises several types for bad files
        raise AdapterError(f"cannot read {weights_path} as a tensor dict: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{weights_path} must hold a dict of tensors, got {type(raw).__name__}")
    tensors = {}
    pattern = re.compile(r"layers\.(\d+)\.self_attn\.(\w+?)(?:\.weight)?$")
    for key, tensor in raw.items():
        match = pattern.search(key)
        if match is None or not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"unexpected entry {key!r} in {weights_path}")
        index, name = match.groups()
        if name in ("delta_k_proj", "delta_v_proj") and config.corrections == "qo":
            if bool(tensor.any()):
                raise AdapterError(f"{key} is non-zero but the adapter's delta_heads are only q and o")
            continue
        tensors[f"layers.{index}.{name}"] = tensor
    _load_tensors(model, config, tensors, str(weights_path))
    return model


def config_from_reference(reference: dict) -> DeltaMemConfig:
    """Map the reference's flat config dict onto DeltaMemConfig, refusing features we do not implement."""
    unsupported = {
        "normalize_qk": True,
        "state_update_mode": "standard",
        "num_memory_partitions": 1,
        "memory_readout_mode": "delta",
        "delta_o_rmsnorm": False,
        "trainable_delta_scale": False,
    }
    for key, allowed in unsupported.items():
        if key in reference and reference[key] != allowed:
            raise AdapterError(f"reference adapter uses {key}={reference[key]!r}; only {allowed!r} is supported")
    heads = int(reference.get("num_state_heads", 1))
    granularity = reference.get("memory_write_granularity", "token")
    if granularity not in ("token", "message_mean"):
        raise AdapterError(f"reference memory_write_granularity {granularity!r} is not supported (token, message_mean)")
    write = "segment" if granularity == "message_mean" else ("multi" if heads > 1 else "token")
    delta_heads = set(reference.get("delta_heads", ("q", "o")))
    layers = tuple(reference.get("target_layers") or ()) or None
    try:
        return DeltaMemConfig(
            rank=reference.get("rank", 8),
            alpha=reference.get("alpha", 16.0),
            write=write,
            num_states=heads if heads > 1 else 4,
            layers=layers,
            corrections="qkvo" if delta_heads & {"k", "v"} else "qo",
            beta_bias_init=reference.get("beta_bias_init", -1.5),
            forget_gate="tied" if reference.get("couple_lambda", True) else "separate",
        )
    except ConfigError as err:
        raise AdapterError(f"reference config cannot be mapped: {err}") from None


def backbone_description(model) -> dict:
    """What an adapter must match: model type, layer count and hidden size of the backbone."""
    config = model.config
    return {
        "model_type": config.model_type,
        "num_layers": getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)),
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
    }


def _load_tensors(model, config: DeltaMemConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    attached_here = not has_memory(model)
    if attached_here:
        attach_memory(model, config)
    elif math_config(attachment_of(model).config) != math_config(config):
        raise AdapterError(
            f"the model already has a different δ-mem config attached; detach_memory(model) before loading {source}"
        )
    try:
        params = memory_parameters(model)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise AdapterError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, param in params.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise AdapterError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{source}: {name} holds NaN or Inf")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name].to(param.dtype))
    except Exception:
        if attached_here:
            detach_memory(model)
        raise


def _atomic_write(target: Path, write) -> None:
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
