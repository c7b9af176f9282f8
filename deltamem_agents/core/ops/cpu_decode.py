"""An optional fused CPU kernel for one decoding step of one memory layer (C++, built on first use).

Decoding runs the memory once per token per layer. In pure torch that is ~25 tiny tensor ops per layer, and
between two layers the backbone streams megabytes of weights through the caches, so every op starts cold: the
ops, not the arithmetic, dominate (see docs/benchmarks/). This kernel does the whole step in one call: the packed
projection, tanh + L2 norm of q and k, the gates, the read, the write and the corrections' matmul.

The source is ``cpu_decode.cpp`` beside this file (package data). It is built with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja) into torch's extension cache the first
time it is enabled; when the build fails, or inputs are not float32 CPU tensors, the pure-torch path runs instead
(same equations; tested equal up to float32 rounding). Enable with :func:`enable_cpu_decode_kernel` or
``DELTAMEM_CPU_KERNEL=1``.
"""

import os
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")  # the C++ kernel, shipped as package data

_lock = threading.Lock()
_module = None
_failed = False
_enabled = os.environ.get("DELTAMEM_CPU_KERNEL", "0") == "1"


def enable_cpu_decode_kernel(enabled: bool = True) -> bool:
    """Turn the fused CPU decode kernel on or off; building it if needed. Returns whether it is usable."""
    global _enabled
    _enabled = enabled
    return kernel() is not None if enabled else False


def kernel():
    """The compiled module, or None when disabled or when the build failed (a warning says why, once)."""
    global _module, _failed
    if not _enabled or _failed:
        return None
    if _module is None:
        with _lock:
            if _module is None and not _failed:
                try:
                    from torch.utils.cpp_extension import load_inline

                    _module = load_inline(
                        name="deltamem_cpu_decode_v3",
                        cpp_sources=SOURCE.read_text(encoding="utf-8"),
                        functions=["decode_step"],
                        extra_cflags=["-O3"],
                        verbose=False,
                    )
                except Exception as err:  # any build problem: fall back to pure torch
                    _failed = True
                    warnings.warn(f"δ-mem CPU decode kernel unavailable, using pure torch: {err}", stacklevel=2)
                    return None
    return _module


def usable_for(x: torch.Tensor, state: torch.Tensor) -> bool:
    """Whether the kernel may run on these tensors (enabled, float32, CPU, no autograd)."""
    return (
        _enabled
        and x.dtype == torch.float32
        and state.dtype == torch.float32
        and not x.is_cuda
        and not state.is_cuda
        and not torch.is_grad_enabled()
    )
