"""δ-mem scan on the GPU through flash-linear-attention's ``chunk_gated_delta_rule`` (see README.md)."""

from deltamem_fla.mapping import from_gdn_state, to_gdn
from deltamem_fla.scan import fla_scan

__all__ = ["fla_scan", "from_gdn_state", "to_gdn"]
