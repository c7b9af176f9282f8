"""Section a: the chunked scan against the token loop, forward and forward+backward, in tokens/s."""

import torch
import torch.nn.functional as F

from deltamem_agents.bench.timing import alternate, median, paired_ratio, timed
from deltamem_agents.core.ops import delta_scan_chunked, delta_scan_recurrent

FULL_LENGTHS = (512, 2048, 8192)
QUICK_LENGTHS = (64, 256)
HEADS = (1, 4)
RANK = 8


def scan_inputs(length: int, heads: int, device: torch.device, grad: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random (state, q, k, v, beta) of batch 1 in float32 with unit-norm q and k, as the memory layer makes."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, length, heads, RANK)
    tensors = [
        torch.zeros(1, heads, RANK, RANK),
        F.normalize(torch.randn(shape, generator=g), dim=-1),
        F.normalize(torch.randn(shape, generator=g), dim=-1),
        torch.randn(shape, generator=g),
        torch.sigmoid(torch.randn(shape, generator=g) - 1.5),
    ]
    return [t.to(device).requires_grad_(grad) for t in tensors]


def _runner(fn, inputs: list[torch.Tensor], backward: bool, device: torch.device):
    def run() -> float:
        def step():
            if not backward:
                with torch.no_grad():
                    return fn(*inputs)
            for t in inputs:
                t.grad = None
            state, reads = fn(*inputs)
            (state.sum() + reads.sum()).backward()

        seconds, _ = timed(step, device)
        return seconds

    return run


def time_scans(length: int, heads: int, backward: bool, device: torch.device, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of the token loop (``recurrent``) and the chunked scan on the same inputs, the two run
    alternately after one warm-up round."""
    inputs = scan_inputs(length, heads, device, grad=backward)
    return alternate(
        {
            "recurrent": _runner(delta_scan_recurrent, inputs, backward, device),
            "chunked": _runner(delta_scan_chunked, inputs, backward, device),
        },
        rounds=rounds,
        warmup=1,
    )


def bench_scan(device: torch.device, quick: bool = False, rounds: int | None = None) -> list[dict]:
    """One row per (T, H, pass): tokens/s of both scans and the speed-up, medians over alternating rounds."""
    rows = []
    lengths = QUICK_LENGTHS if quick else FULL_LENGTHS
    rounds = rounds or (2 if quick else 5)
    for length in lengths:
        for heads in HEADS:
            for backward in (False, True):
                seconds = time_scans(length, heads, backward, device, rounds)
                rows.append(
                    {
                        "T": length,
                        "H": heads,
                        "pass": "forward+backward" if backward else "forward",
                        "recurrent_tok_s": length / median(seconds["recurrent"]),
                        "chunked_tok_s": length / median(seconds["chunked"]),
                        "speedup": paired_ratio(seconds["recurrent"], seconds["chunked"]),
                        "runs": rounds,
                    }
                )
                print(
                    f"  scan T={length:5d} H={heads} {rows[-1]['pass']:16s} recurrent "
                    f"{rows[-1]['recurrent_tok_s']:10.0f} tok/s  chunked {rows[-1]['chunked_tok_s']:10.0f} tok/s  "
                    f"x{rows[-1]['speedup']:.1f}",
                    flush=True,
                )
    return rows
