"""What a run measures about itself: seconds per stage (Stopwatch) and peak memory (PeakMemory).

The pipeline and every tool measure through these two, so a figure in run.json, a benchmark and the
GPU check mean the same thing. A tool timing one block (a forward) calls `Stopwatch.restart()` before
it and `lap()` after it; a tool measuring one block's memory reads `PeakMemory.increase()`, the peak
above what was in use when the probe started. `proc_status_mb` is the one reader of /proc/self/status.
"""

from __future__ import annotations

import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .device import init_device

PROC_CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing "5" resets VmHWM to the current RSS
PROC_STATUS = Path("/proc/self/status")  # Linux: VmHWM, the peak RSS since that reset
PROCESS_PEAK_NOTE = ("peak_memory_mb.cpu_rss is this process's lifetime peak (ru_maxrss), which may be an earlier "
                     "run's: the peak could not be reset here (Linux /proc/self/clear_refs)")


def proc_status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MiB (VmHWM: peak RSS, VmRSS: RSS now, RssAnon: RSS not
    backed by a file); None where there is no such file or line."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _vm_hwm_mb() -> float | None:
    return proc_status_mb("VmHWM")


def _reset_rss_peak() -> bool:
    """Start a new RSS high-water mark; False where the OS does not allow it."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm_mb() is not None


class PeakMemory:
    """This run's peak memory, not the process's. A `-m` sweep runs every job in one process, and
    ru_maxrss or CUDA's max_memory_allocated alone would report the largest run so far for every
    later run; so both high-water marks are reset when the run starts. What was in use at that
    moment is kept too, for `increase`."""

    def __init__(self, device: str):
        self.device = device
        self.rss_is_per_run = _reset_rss_peak()
        self.start = {"cpu_rss": proc_status_mb("VmRSS")}
        if device.startswith("cuda"):
            init_device(device)  # before the reset: an indexed device's statistics need CUDA started
            torch.cuda.reset_peak_memory_stats(device)
            self.start["cuda_allocated"] = torch.cuda.memory_allocated(device) / 2**20

    def report(self) -> dict[str, float]:
        """{"cpu_rss": MiB[, "cuda_allocated": MiB]}; see `note` for what cpu_rss covers."""
        if self.rss_is_per_run and (hwm := _vm_hwm_mb()) is not None:
            peak = {"cpu_rss": round(hwm, 1)}
        else:
            peak = {"cpu_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
        if self.device.startswith("cuda"):
            peak["cuda_allocated"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return peak

    def increase(self) -> dict[str, float | None]:
        """The peaks above what was in use at the start, in MiB (unrounded): one block's own memory,
        the weights it found loaded excluded. cpu_rss is None where the RSS peak could not be reset."""
        peak = {"cpu_rss": _vm_hwm_mb() if self.rss_is_per_run else None}
        if self.device.startswith("cuda"):
            peak["cuda_allocated"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return {k: None if v is None or self.start.get(k) is None else v - self.start[k] for k, v in peak.items()}

    @property
    def note(self) -> str | None:
        """A sentence for run.json when cpu_rss is not this run's own peak."""
        return None if self.rss_is_per_run else PROCESS_PEAK_NOTE


class Stopwatch:
    """Seconds per named stage, in order. On a GPU each lap first waits for the device's queued
    work (CUDA runs asynchronously: the last VAE batch would otherwise be booked to the next stage);
    laps mark stage boundaries only, never steps of a loop, so this costs one sync per stage."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()
        self.started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    def _sync(self) -> None:
        if self.device is not None and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def restart(self) -> None:
        """Start the next lap now, after the device's queued work: a lap then times one block only."""
        self._sync()
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> float:
        """Book the seconds since the last lap (or start) to `stage`; returns them unrounded (timings
        keep milliseconds, too coarse for one small forward)."""
        self._sync()
        now = time.perf_counter()
        seconds = now - self._clock
        self.timings[stage] = round(seconds, 3)
        self._clock = now
        return seconds
