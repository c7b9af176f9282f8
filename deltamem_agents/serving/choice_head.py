"""A tool-choice head: a linear read-out of the backbone's hidden states in the channel-scoring forward.

The likelihood choice (``serving.tool_choice.channel_scores``) already runs one sequence per action: the system
message, "The user's message asks for this action: <action>", then the conversation up to the newest user
message. The head reads the hidden states of that sequence's last token at a few layers (standardised with the
training set's mean and std) and adds a learned score:

    head(h) = w · ((h - mean) / std) + b_action_kind      h: (A, F) = the chosen layers' states, concatenated

so the choice is ``channel_weight * channel + head``. It costs nothing at decode time and next to nothing when
scoring (the states come from the same forward); the backbone, its memory and every reply are unchanged.
``b_action_kind`` is one bias for the reply action (a tool gets 0). Trained by ``scripts/train_choice_head.py``
on generated requests over tool sets of other domains than the request set's (``train.choice_training``).

Files: ``choice_head.safetensors`` (weight, mean, std, reply_bias) and ``choice_head.json`` (layers, the channel
weight it was trained with, training command and numbers). Nothing is unpickled.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltamem_agents.core.errors import AdapterError

WEIGHTS_FILE = "choice_head.safetensors"
CONFIG_FILE = "choice_head.json"
TENSORS = ("weight", "mean", "std", "reply_bias")


@dataclass
class ChoiceHead:
    """The read-out: ``layers`` (hidden-state indices, 0 = embeddings), ``weight``/``mean``/``std``: (F,),
    ``reply_bias``: (1,), ``channel_weight``: the weight of the channel score it was trained beside."""

    layers: tuple[int, ...]
    weight: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    reply_bias: torch.Tensor
    channel_weight: float = 1.0
    info: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, layers, hidden_size: int, channel_weight: float = 1.0) -> "ChoiceHead":
        """A head that adds 0 to every action (its features: ``len(layers) * hidden_size``)."""
        size = len(layers) * hidden_size
        return cls(
            tuple(layers), torch.zeros(size), torch.zeros(size), torch.ones(size), torch.zeros(1), channel_weight
        )

    def score(self, features: torch.Tensor, is_reply: torch.Tensor) -> torch.Tensor:
        """(A,) head scores of (A, F) features; ``is_reply``: (A,) bool."""
        standard = (features.float() - self.mean) / self.std  # (A, F)
        return standard @ self.weight + is_reply.float() * self.reply_bias  # (A,)

    def fingerprint(self) -> str:
        """sha256 over the layers, the channel weight and every tensor."""
        digest = hashlib.sha256(json.dumps([list(self.layers), self.channel_weight]).encode())
        for name in TENSORS:
            digest.update(getattr(self, name).detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory) -> Path:
        """Write ``choice_head.safetensors`` and ``choice_head.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).detach().float().contiguous() for n in TENSORS}, str(directory / WEIGHTS_FILE))
        config = {"layers": list(self.layers), "channel_weight": self.channel_weight, "info": self.info}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def load(cls, directory, hidden_size: int | None = None, num_states: int | None = None) -> "ChoiceHead":
        """Read a saved head; with ``hidden_size`` / ``num_states`` (the model's hidden size and its number of
        hidden states, layers + 1) a head made for another backbone is refused with a clear error."""
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
            raise AdapterError(
                f"{directory} is not a tool-choice head: it needs {WEIGHTS_FILE} and {CONFIG_FILE} "
                "(made by scripts/train_choice_head.py)"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
        if set(tensors) != set(TENSORS):
            raise AdapterError(f"{directory}: expected the tensors {list(TENSORS)}, found {sorted(tensors)}")
        layers = tuple(config["layers"])
        size = tensors["weight"].shape[0]
        if any(tensors[n].shape != (size,) for n in ("mean", "std")) or size % len(layers):
            raise AdapterError(f"{directory}: weight, mean and std must have one length, a multiple of the layers")
        if tensors["reply_bias"].shape != (1,):
            raise AdapterError(
                f"{directory}: reply_bias must hold one number, not {tuple(tensors['reply_bias'].shape)}"
            )
        if hidden_size is not None and size != len(layers) * hidden_size:
            raise AdapterError(
                f"{directory}: this head reads {size // len(layers)}-wide states, the model's are {hidden_size} "
                "wide; it was trained for another backbone"
            )
        if num_states is not None and max(layers) >= num_states:
            raise AdapterError(f"{directory}: this head reads layer {max(layers)}, the model has {num_states - 1}")
        return cls(layers, *(tensors[n] for n in TENSORS), config["channel_weight"], config.get("info", {}))
