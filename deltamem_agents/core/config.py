"""DeltaMemConfig: every choice that shapes a δ-mem adapter, validated with pydantic."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltamem_agents.core.errors import ConfigError

WriteStrategy = Literal["token", "segment", "multi"]


class DeltaMemConfig(BaseModel):
    """Configuration of a δ-mem adapter (see METHOD.md for the meaning of each symbol).

    Attributes:
        rank: r, the side of each square memory state.
        alpha: correction scale numerator; reads are multiplied by ``alpha / rank``.
        write: ``token`` (TSW, one write per token), ``segment`` (SSW, one write per chat message) or
            ``multi`` (MSW, ``num_states`` parallel states with token writes).
        num_states: number of parallel states H for ``multi`` (ignored otherwise: H = 1).
        layers: indices of the attention layers that get memory; ``None`` means every layer.
        corrections: ``qo`` (the paper: query and output corrections) or ``qkvo`` (also key and value).
        beta_bias_init: initial write-gate bias b_beta (the paper: -1.5, so beta0 = sigmoid(-1.5) = 0.18).
        forget_gate: ``tied`` (lambda = 1 - beta, the paper) or ``separate`` (lambda = sigmoid(W_l x + b_l)).
        lambda_bias_init: initial b_lambda for the separate forget gate (default: -beta_bias_init).
        correction_init: ``base_slice`` (the paper: slices of the frozen q/o weights times ``correction_gain``)
            or ``zero`` (the wrapped model then equals the backbone until the corrections are trained).
        correction_gain: the base-slice gain (0.05).
        chunk_size: chunk length of the parallel scan used for prefill and training.
        init_seed: seed of the random initialisation of the memory projections, so the same backbone and config
            always give the same untrained adapter (and the same state fingerprint) in every process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    write: WriteStrategy = "token"
    num_states: int = Field(4, ge=1, le=64)
    layers: tuple[int, ...] | None = None
    corrections: Literal["qo", "qkvo"] = "qo"
    beta_bias_init: float = -1.5
    forget_gate: Literal["tied", "separate"] = "tied"
    lambda_bias_init: float | None = None
    correction_init: Literal["base_slice", "zero"] = "base_slice"
    correction_gain: float = 0.05
    chunk_size: int = Field(16, ge=1, le=4096)
    init_seed: int = 0

    @field_validator("layers")
    @classmethod
    def _layers_unique_non_negative(cls, value):
        if value is None:
            return value
        if len(value) == 0 or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("layers must be None (all) or a non-empty list of distinct non-negative indices")
        return tuple(sorted(value))

    def __init__(self, **values):
        """Validate ``values``; a bad field raises ConfigError naming the field and what is allowed."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_explain(err)) from None

    @property
    def num_heads(self) -> int:
        """H, the number of parallel r x r states per layer."""
        return self.num_states if self.write == "multi" else 1

    @property
    def read_dim(self) -> int:
        """R = H * r, the width of the concatenated reads."""
        return self.num_heads * self.rank

    @property
    def scale(self) -> float:
        """alpha / r, the factor on every correction."""
        return self.alpha / self.rank

    @property
    def lambda_bias(self) -> float:
        """The separate forget gate's initial bias."""
        return -self.beta_bias_init if self.lambda_bias_init is None else self.lambda_bias_init


def _explain(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "config"
        lines.append(f"DeltaMemConfig.{field}: {item['msg']} (got {item.get('input')!r})")
    return "invalid δ-mem config:\n  " + "\n  ".join(lines)


# The adapter an engine attaches when it is given none: the paper's config with zero-init corrections, so an
# untrained memory never changes the backbone's answers (every correction is exactly 0 whatever is written).
IDENTITY_CONFIG = DeltaMemConfig(correction_init="zero")
