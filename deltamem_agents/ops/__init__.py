"""δ-mem scan operators: the reference token loop and the exact chunk-parallel form."""

from deltamem_agents.ops.chunked import delta_scan_chunked
from deltamem_agents.ops.recurrent import delta_scan_recurrent

__all__ = ["delta_scan_chunked", "delta_scan_recurrent"]
