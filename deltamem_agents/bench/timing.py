"""Timing helpers: a synchronising clock, alternating sides round by round, medians and percentiles, and peak
memory."""

import resource
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# On a CPU run with one torch thread all the work happens on the calling thread, so its CPU time is the time the
# work took without the time other processes on the same core took from it (this machine's core is shared).
# Elsewhere (GPU, several threads) the wall clock is used. ``use_clock`` picks; ``clock_name`` is recorded.
_clock: Callable[[], float] = time.perf_counter
clock_name = "wall"


def use_clock(device: torch.device, threads: int) -> str:
    """Measure with this thread's CPU time on a one-thread CPU run, else with the wall clock; returns which."""
    global _clock, clock_name
    if device.type == "cpu" and threads == 1:
        _clock, clock_name = time.thread_time, "thread CPU time"
    else:
        _clock, clock_name = time.perf_counter, "wall"
    return clock_name


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """``(seconds, result)`` of one call, synchronised on GPU, on the clock chosen by :func:`use_clock`."""
    sync(device)
    start = _clock()
    result = fn()
    sync(device)
    return _clock() - start, result


def alternate(sides: dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every side once per round, rotating the order each round, after ``warmup`` unrecorded rounds.

    Each callable returns the seconds it measured itself (so set-up work can stay outside the clock).
    Returns the recorded seconds per side, one per round.
    """
    names = list(sides)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            value = sides[name]()
            if index >= warmup:
                seconds[name].append(value)
    return seconds


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between the two nearest ranks
    (``percentile(v, 50) == median(v)``); nan for no values."""
    import numpy

    return float(numpy.percentile(values, min(max(q, 0.0), 100.0))) if values else float("nan")


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator, pairing the values of the same round."""
    return median([a / b for a, b in zip(numerator, denominator) if b > 0])


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on GPU, else the process RSS sampled every 2 ms.

    ``peak_bytes`` is the highest value seen minus the value at entry (what the block added at its worst).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        process = psutil.Process()
        self._base = process.memory_info().rss
        self._peak = self._base

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.peak_bytes = self._peak - self._base


def max_rss_bytes() -> int:
    """The process's lifetime peak RSS (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
