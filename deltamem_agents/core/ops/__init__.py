"""δ-mem scan operators: the reference token loop, the exact chunk-parallel form and the one-token step."""

from deltamem_agents.core.ops.chunked import delta_scan_chunked
from deltamem_agents.core.ops.recurrent import delta_scan_recurrent
from deltamem_agents.core.ops.step import delta_step

__all__ = ["delta_scan_chunked", "delta_scan_recurrent", "delta_step"]
