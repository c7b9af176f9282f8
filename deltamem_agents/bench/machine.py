"""Where a benchmark ran (CPU model, cores used, threads, torch version and device, recorded on every row), and
how busy the machine was while it ran."""

import os
import platform
import time

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """A flat description of the machine and process settings the numbers depend on."""
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = list(range(os.cpu_count() or 1))
    info = {
        "cpu": cpu_model(),
        "cores_used": len(affinity),
        "cpu_affinity": ",".join(str(c) for c in affinity),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class CpuSampler:
    """How busy the machine's CPUs were during a run, to tell our processes' work from everything else's.

    Samples the machine-wide CPU times and the CPU time of the local PostgreSQL server processes every
    ``interval_s`` seconds on a background thread; :meth:`cores_between` gives the average number of cores busy
    (all processes) and used by Postgres between two wall-clock times (epoch seconds).
    """

    def __init__(self, interval_s: float = 0.5):
        import threading

        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []  # (epoch s, machine busy CPU s, postgres CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import psutil

        times = psutil.cpu_times()
        busy = times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        postgres = 0.0
        for process in psutil.process_iter(["name"]):
            if (process.info["name"] or "").startswith("postgres"):
                try:
                    cpu = process.cpu_times()  # children: backends that exited, counted by the postmaster
                    postgres += cpu.user + cpu.system + cpu.children_user + cpu.children_system
                except psutil.Error:
                    pass  # exited or not ours to read
        return time.time(), busy, postgres

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())

    def cores_between(self, start: float, end: float) -> dict:
        """``{"cpu_busy_cores", "postgres_cores"}`` averaged over the samples nearest to ``[start, end]``."""
        if len(self.samples) < 2 or end <= start:
            return {"cpu_busy_cores": float("nan"), "postgres_cores": float("nan")}
        # A backend that has exited but is not yet reaped by the postmaster is counted nowhere for a moment: the
        # Postgres total can dip. It only grows otherwise, so a running maximum removes the dips.
        samples, top = [], 0.0
        for when, busy, postgres in self.samples:
            top = max(top, postgres)
            samples.append((when, busy, top))
        first = min(samples, key=lambda s: abs(s[0] - start))
        last = min(samples, key=lambda s: abs(s[0] - end))
        seconds = last[0] - first[0]
        if seconds <= 0:
            return {"cpu_busy_cores": float("nan"), "postgres_cores": float("nan")}
        return {"cpu_busy_cores": (last[1] - first[1]) / seconds, "postgres_cores": (last[2] - first[2]) / seconds}
