"""The fused CPU kernel for one decoding step of one memory layer: built at install time, on by default.

Decoding runs the memory once per token per layer. In pure torch that is ~10-25 tiny tensor ops per layer, and
between two layers the backbone streams megabytes of weights through the caches, so every op starts cold: the
ops, not the arithmetic, dominate (see docs/benchmarks/). This kernel does a layer's whole step in one call:

- ``decode_step`` (writes on): the packed projection, tanh + L2 norm of q and k, the gates, the read, the write
  and the corrections' matmul;
- ``read_step`` (writes off, the chat's decode): the query projection, tanh + L2 norm, the read and the
  corrections' matmul.

The source is ``cpu_decode.cpp`` beside this file (package data): plain C ABI, no torch headers, called through
:mod:`ctypes`. ``scripts/setup.sh`` builds it once (:func:`main`, also the command ``deltamem-build-kernel``;
about a second) into :func:`kernel_dir`, under a name that carries the source's hash. At run time the library only LOADS
that file, never compiles: when it is absent (or stale, or fails its load-time self-check against pure torch)
the pure-torch path runs instead, with the same equations (tested equal up to float32 rounding). The kernel is
on whenever it is built; ``DELTAMEM_CPU_KERNEL=0`` (or :func:`enable_cpu_decode_kernel(False)`) turns it off.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_decode.cpp")  # the C++ kernel, shipped as package data
ABI_VERSION = 4  # must equal deltamem_cpu_decode_abi() in the source
CXX_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17")
MAX_RANK, MAX_READ_DIM = 64, 1024  # the kernel's stack buffers (cpu_decode.cpp)

_lock = threading.Lock()
_library = None  # the loaded ctypes library, once loaded
_loaded = False  # whether loading was attempted (it is attempted once per process)
_enabled = os.environ.get("DELTAMEM_CPU_KERNEL", "1") != "0"

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SIGNATURES = {
    "deltamem_decode_step": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _D],
    "deltamem_read_step": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _D],
    "deltamem_add_rows": [_P, _I, _P, _I, _I, _I],
}


def kernel_dir() -> Path:
    """Where the built kernel lives: ``$DELTAMEM_KERNEL_DIR``, else ``share/deltamem-agents/kernels`` under the
    Python environment's prefix (the virtual environment), so it goes with the installation it was built for."""
    configured = os.environ.get("DELTAMEM_KERNEL_DIR")
    return Path(configured) if configured else Path(sys.prefix) / "share" / "deltamem-agents" / "kernels"


def library_path() -> Path:
    """The file the current source builds to (its name carries a hash of the source, the flags and the ABI)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXX_FLAGS).encode() + bytes([ABI_VERSION]))
    return kernel_dir() / f"deltamem_cpu_decode-{digest.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile the kernel into :func:`library_path` (install time; idempotent: an existing build is kept).

    Needs a C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``). Raises RuntimeError saying what
    failed. Returns the library's path."""
    target = library_path()
    if target.exists() and not force:
        return target
    compiler = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++); δ-mem decodes in pure torch")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"cannot create {target.parent} ({err}); set $DELTAMEM_KERNEL_DIR to a writable folder"
        raise RuntimeError(message) from err
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        command = [compiler, *CXX_FLAGS, str(SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPU decode kernel failed: {' '.join(command)}\n{done.stderr}")
        os.replace(partial, target)  # atomic: a concurrent loader sees the whole file or none
    return target


def enable_cpu_decode_kernel(enabled: bool = True) -> bool:
    """Turn the fused CPU decode kernel on or off (it is on by default when built). Never compiles: returns
    whether a built kernel is loaded and in use (run ``python -m deltamem_agents.core.ops.cpu_decode`` to build
    one)."""
    global _enabled
    _enabled = enabled
    return kernel() is not None if enabled else False


def reload() -> None:
    """Forget the loaded kernel, so the next :func:`kernel` call looks for the built file again (after a build,
    or in tests that change ``$DELTAMEM_KERNEL_DIR``)."""
    global _library, _loaded
    with _lock:
        _library, _loaded = None, False


def kernel():
    """The loaded kernel library, or None when disabled, not built, or refused by its self-check (a warning says
    why, once; a kernel that is simply not built is not an error: pure torch runs, see the module docstring)."""
    global _library, _loaded
    if not _enabled:
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _library = _load()
                _loaded = True
    return _library


def _load():
    path = library_path()
    if not path.exists():
        return None
    try:
        library = ctypes.CDLL(str(path))
        library.deltamem_cpu_decode_abi.restype = ctypes.c_int64
        if library.deltamem_cpu_decode_abi() != ABI_VERSION:
            raise RuntimeError(f"{path} reports ABI {library.deltamem_cpu_decode_abi()}, expected {ABI_VERSION}")
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
        _self_check(library)
    except Exception as err:  # a broken or foreign file: never use it, say so once
        warnings.warn(f"δ-mem CPU decode kernel {path} refused, using pure torch: {err}", stacklevel=3)
        return None
    return library


def usable_for(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel may run on these tensors: float32 CPU input, state and memory weights (``weight``, e.g.
    the layer's memory_q_proj), no autograd. Sizes are checked with :func:`supports`."""
    return (
        x.dtype == state.dtype == weight.dtype == torch.float32
        and x.is_cpu
        and state.is_cpu
        and weight.is_cpu
        and not torch.is_grad_enabled()
    )


def supports(heads: int, rank: int) -> bool:
    """Whether the kernel's buffers fit this layer (r <= 64, H * r <= 1024)."""
    return rank <= MAX_RANK and heads * rank <= MAX_READ_DIM


def decode_step(library, x, projection, bias, state, corrections, heads, rank, separate, eps):
    """One token with writes on. x ``(B, 1, d)``, projection ``(nR, d)``, bias ``(nR,)``, state
    ``(B, H, r, r)``, corrections ``(R, Q)``; all float32 CPU. Returns ``(delta (B, 1, Q), new_state)``."""
    x, state = x.contiguous(), state.contiguous()
    batch, d = x.shape[0], x.shape[-1]
    new_state = torch.empty_like(state)  # (B, H, r, r)
    delta = torch.empty(batch, 1, corrections.shape[1])  # (B, 1, Q)
    library.deltamem_decode_step(
        x.data_ptr(), projection.data_ptr(), bias.data_ptr(), state.data_ptr(), corrections.data_ptr(),
        new_state.data_ptr(), delta.data_ptr(), None, batch, d, projection.shape[0], heads, rank,
        corrections.shape[1], 0, int(separate), eps,
    )  # fmt: skip
    return delta, new_state


def read_step(library, x, query, state, corrections, heads, rank, eps):
    """One token with writes off. x ``(B, 1, d)``, query ``(R, d)`` (the first R rows of the packed
    projection), state ``(B or 1, H, r, r)``, corrections ``(R, Q)``. Returns ``delta (B, 1, Q)``."""
    x, state = x.contiguous(), state.contiguous()
    batch, d = x.shape[0], x.shape[-1]
    delta = torch.empty(batch, 1, corrections.shape[1])  # (B, 1, Q)
    library.deltamem_read_step(
        x.data_ptr(), query.data_ptr(), state.data_ptr(), corrections.data_ptr(), delta.data_ptr(), None,
        batch, d, heads, rank, corrections.shape[1], 0, state.shape[0], eps,
    )  # fmt: skip
    return delta


def add_columns(library, output: torch.Tensor, delta: torch.Tensor, columns: slice) -> bool:
    """``output += delta[..., columns]`` in place for a contiguous float32 CPU ``output (B, T, out)`` and the
    kernel's ``delta (B, T, Q)``; returns False (nothing done) when ``output`` is not such a tensor."""
    if not (output.dtype == torch.float32 and output.is_cpu and output.is_contiguous()):
        return False
    width, total = output.shape[-1], delta.shape[-1]
    start = columns.start
    library.deltamem_add_rows(
        output.data_ptr(), width, delta.data_ptr() + 4 * start, total, output.numel() // width, width
    )
    return True


def _self_check(library) -> None:
    """Run both entry points once on small random inputs against pure torch; raise when they disagree."""
    from deltamem_agents.core.ops.step import delta_step

    g = torch.Generator().manual_seed(0)
    heads, rank, d, batch, out = 2, 4, 24, 3, 10
    width = heads * rank
    x = torch.randn(batch, 1, d, generator=g)
    projection = torch.randn(5 * width, d, generator=g) / d**0.5
    bias = torch.cat([torch.zeros(3 * width), torch.randn(2 * width, generator=g)])  # q, k, v have no bias
    state = torch.randn(batch, heads, rank, rank, generator=g)
    corrections = torch.randn(width, out, generator=g)
    with torch.no_grad():
        z = x[:, 0] @ projection.t() + bias  # (B, 5R)
        q, k, v, beta, lam = (part.view(batch, heads, rank) for part in z.split(width, dim=1))
        q = torch.nn.functional.normalize(torch.tanh(q), dim=-1, eps=1e-6)
        k = torch.nn.functional.normalize(torch.tanh(k), dim=-1, eps=1e-6)
        ref_state, reads = delta_step(state, q, k, v, torch.sigmoid(beta), torch.sigmoid(lam))
        ref_delta = reads.reshape(batch, 1, width) @ corrections  # (B, 1, Q)
        delta, new_state = decode_step(library, x, projection, bias, state, corrections, heads, rank, True, 1e-6)
        read_only = read_step(library, x, projection[:width], state, corrections, heads, rank, 1e-6)
        base = torch.randn(batch, 1, 4, generator=g)
        added = base.clone()
        add_columns(library, added, ref_delta, slice(3, 7))
    checks = [
        (delta, ref_delta, "decode corrections"),
        (new_state, ref_state, "decode state"),
        (read_only, ref_delta, "read corrections"),
        (added, base + ref_delta[..., 3:7], "added columns"),
    ]
    for got, want, what in checks:
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"self-check failed: {what} differ from pure torch")


def main(argv: list[str] | None = None) -> int:
    """Build the kernel and load it once (``scripts/setup.sh``); ``--force`` rebuilds. Returns an exit code."""
    try:
        built = build(force="--force" in (sys.argv[1:] if argv is None else argv))
    except RuntimeError as error:
        print(f"δ-mem CPU decode kernel not built (decoding runs in pure torch): {error}", file=sys.stderr)
        return 1
    reload()
    if not enable_cpu_decode_kernel(True):
        print(f"δ-mem CPU decode kernel built at {built} but refused by its self-check", file=sys.stderr)
        return 1
    print(f"δ-mem CPU decode kernel: {built}")
    return 0
