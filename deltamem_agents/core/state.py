"""MemoryState: an immutable value holding every memory layer's state, with a safe byte format.

The bytes are a safetensors file with ONE packed float32 tensor ``state`` of shape (L, B, H, r, r) and string
metadata; nothing is ever unpickled. Loading checks format, version, shapes, dtype, finiteness and (when asked)
the adapter fingerprint, and raises MemoryStateError with the reason otherwise.
"""

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from deltamem_agents.core.errors import MemoryStateError

FORMAT_NAME = "deltamem-state"
FORMAT_VERSION = "1"
TENSOR_NAME = "state"


@dataclass(frozen=True, eq=False)
class MemoryState:
    """Per-layer δ-mem states of a batch of conversations (usually one thread: B = 1).

    Attributes:
        tensor: ``(L, B, H, r, r)`` float32; L = number of memory layers. Treat as read-only.
        fingerprint: the adapter fingerprint this state was written with (see ``adapter_fingerprint``).
        layers: the backbone layer index of each of the L states.
    """

    tensor: torch.Tensor
    fingerprint: str
    layers: tuple[int, ...]

    def __post_init__(self):
        if self.tensor.dim() != 5 or self.tensor.shape[-1] != self.tensor.shape[-2]:
            raise MemoryStateError(f"a memory state must be (L, B, H, r, r), got {tuple(self.tensor.shape)}")
        if self.tensor.shape[0] != len(self.layers):
            raise MemoryStateError(f"state has {self.tensor.shape[0]} layers but {len(self.layers)} layer indices")

    @classmethod
    def zeros(cls, layers: tuple[int, ...], heads: int, rank: int, fingerprint: str, batch: int = 1):
        """The empty memory (S_0 = 0 in every layer)."""
        return cls(torch.zeros(len(layers), batch, heads, rank, rank), fingerprint, tuple(layers))

    @property
    def batch_size(self) -> int:
        return self.tensor.shape[1]

    @property
    def nbytes(self) -> int:
        """Size of the raw state numbers (the serialized bytes add a small header)."""
        return self.tensor.numel() * self.tensor.element_size()

    def is_zero(self) -> bool:
        return not bool(self.tensor.any())

    def select(self, index: int) -> "MemoryState":
        """The state of one batch row, as a batch of one."""
        return MemoryState(self.tensor[:, index : index + 1].clone(), self.fingerprint, self.layers)

    @classmethod
    def stack(cls, states: list["MemoryState"]) -> "MemoryState":
        """Concatenate batches of states from the same adapter."""
        if not states:
            raise MemoryStateError("cannot stack an empty list of memory states")
        first = states[0]
        for other in states[1:]:
            first.check_compatible(other.fingerprint, other.layers)
        return cls(torch.cat([s.tensor.cpu() for s in states], dim=1), first.fingerprint, first.layers)

    def check_compatible(self, fingerprint: str, layers: tuple[int, ...]) -> None:
        """Raise MemoryStateError unless this state was written by the adapter with ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise MemoryStateError(
                f"memory state was written by adapter {self.fingerprint}, but this model's adapter is "
                f"{fingerprint}; a state is only meaningful for the adapter (and backbone) that wrote it. Start "
                "this thread from an empty memory or load the adapter that wrote it."
            )
        if tuple(layers) != self.layers:
            raise MemoryStateError(f"memory state covers layers {self.layers}, the model has memory on {layers}")

    def equal(self, other: "MemoryState") -> bool:
        """Exact equality of fingerprint, layers and every number."""
        return (
            self.fingerprint == other.fingerprint
            and self.layers == other.layers
            and torch.equal(self.tensor.cpu(), other.tensor.cpu())
        )

    def to_bytes(self) -> bytes:
        """Serialize as safetensors bytes (float32 packed tensor plus metadata)."""
        tensor = self.tensor.detach().to("cpu", torch.float32).contiguous()  # (L, B, H, r, r)
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "layers": json.dumps(list(self.layers)),
            "shape": json.dumps(list(tensor.shape)),
            "dtype": "float32",
        }
        return _deterministic_safetensors(tensor, metadata)

    @classmethod
    def from_bytes(
        cls, data: bytes, fingerprint: str | None = None, layers: tuple[int, ...] | None = None
    ) -> "MemoryState":
        """Parse and validate bytes from :meth:`to_bytes`.

        Args:
            data: the serialized state.
            fingerprint: when given, the adapter fingerprint the state must carry.
            layers: when given, the memory layers the state must cover (the model's ``Attachment.layers``).

        Raises:
            MemoryStateError: not bytes, truncated or corrupted, another format or version, shape or dtype not
                as declared, NaN/Inf values, or (with ``fingerprint`` / ``layers``) written by another adapter.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MemoryStateError(f"memory state must be bytes, got {type(data).__name__}")
        data = bytes(data)
        try:
            tensors = load_safetensors(data)
            metadata = _read_metadata(data)
        except (SafetensorError, ValueError, KeyError, UnicodeDecodeError, OverflowError) as err:
            raise MemoryStateError(
                f"memory state bytes are truncated or corrupted ({len(data)} bytes): {err}. Restore the thread "
                "from an earlier checkpoint or start it from an empty memory."
            ) from None
        if metadata.get("format") != FORMAT_NAME:
            raise MemoryStateError(f"not a δ-mem memory state (format {metadata.get('format')!r})")
        if metadata.get("version") != FORMAT_VERSION:
            raise MemoryStateError(
                f"memory state format version {metadata.get('version')!r} is not supported (expected "
                f"{FORMAT_VERSION}); upgrade deltamem-agents to read it"
            )
        if set(tensors) != {TENSOR_NAME}:
            raise MemoryStateError(f"memory state must hold exactly the tensor {TENSOR_NAME!r}, got {sorted(tensors)}")
        tensor = tensors[TENSOR_NAME]
        try:
            stored_layers = tuple(int(i) for i in json.loads(metadata["layers"]))
            shape = [int(i) for i in json.loads(metadata["shape"])]
        except (KeyError, TypeError, ValueError) as err:
            raise MemoryStateError(f"memory state metadata is malformed: {err}") from None
        if tensor.dtype != torch.float32 or metadata.get("dtype") != "float32":
            raise MemoryStateError(f"memory state must be float32, got {tensor.dtype}")
        if list(tensor.shape) != shape or tensor.dim() != 5 or shape[-1] != shape[-2] or shape[0] != len(stored_layers):
            raise MemoryStateError(
                f"memory state shape {list(tensor.shape)} does not match its metadata (shape {shape}, "
                f"{len(stored_layers)} layers)"
            )
        if not torch.isfinite(tensor).all():
            raise MemoryStateError("memory state holds NaN or Inf values; it cannot be used")
        state = cls(tensor, metadata.get("fingerprint", ""), stored_layers)
        if fingerprint is not None:
            state.check_compatible(fingerprint, state.layers if layers is None else tuple(layers))
        elif layers is not None and tuple(layers) != state.layers:
            raise MemoryStateError(f"memory state covers layers {state.layers}, the model has memory on {layers}")
        return state


def _deterministic_safetensors(tensor: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """Safetensors bytes with a sorted, stable header, so equal states give equal bytes (the library's writer
    orders metadata keys differently from run to run). Readable by any safetensors reader."""
    data = tensor.numpy().tobytes()
    header = {
        "__metadata__": metadata,
        TENSOR_NAME: {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, len(data)]},
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded + data


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (header: 8-byte little-endian length, then JSON)."""
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ValueError("header length out of range")
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a mapping")
    return metadata
