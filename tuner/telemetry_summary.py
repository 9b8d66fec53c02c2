"""What telemetry measured over one trial's window, as plain values: the summaries of the GPUs
(NVML) and the host (psutil) that :mod:`tuner.telemetry` computes and :mod:`tuner.record` stores.

No sampler and no NVML here: the record reads these types without loading the samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuSummary:
    """Aggregates for one GPU over a sampling window; None where the GPU did not report."""

    index: int
    name: str | None
    samples: int
    duration_s: float | None
    power_mean_w: float | None
    power_max_w: float | None
    energy_j: float | None
    energy_source: str | None  # "counter" | "integrated" | None
    mem_used_peak_mib: float | None
    mem_increase_mib: float | None
    util_gpu_mean_pct: float | None
    util_mem_mean_pct: float | None
    temp_max_c: float | None
    sm_clock_mean_mhz: float | None
    fan_mean_pct: float | None
    throttle_reasons: list[str] | None
    #: Compute processes on this GPU other than the inference server (max seen), and their
    #: mean SM utilisation (%) over the window; None where NVML cannot tell.
    other_processes: int | None = None
    other_util_pct: float | None = None


@dataclass(frozen=True)
class HostSummary:
    """Host aggregates over a sampling window."""

    samples: int
    cpu_util_mean_pct: float | None
    mem_used_peak_mib: float | None
    server_rss_peak_mib: float | None
    #: Wall seconds of the window, and CPU-seconds used in it by processes other than the
    #: tuner and the inference server (system busy + steal - own); None when not measured.
    wall_s: float | None = None
    foreign_cpu_s: float | None = None
    #: The 1-minute load average at the end, and the lowest CPU clock seen as a share of the
    #: highest the CPU reports (1.0 = no drop); None where the OS does not tell.
    load_avg_1m: float | None = None
    cpu_freq_min_ratio: float | None = None
    #: The other process that used the most CPU in the window, and its CPU % (100 = a core).
    busiest: str | None = None
    busiest_pct: float | None = None

    @property
    def interference_pct(self) -> float | None:
        """100 x CPU-seconds of other processes / wall seconds (one busy core = 100)."""
        if self.foreign_cpu_s is None or not self.wall_s:
            return None
        return max(0.0, 100.0 * self.foreign_cpu_s / self.wall_s)


@dataclass(frozen=True)
class TelemetrySummary:
    """Everything measured during one trial window."""

    gpus: list[GpuSummary]
    host: HostSummary

    @property
    def interference_pct(self) -> float | None:
        """CPU interference of the window (see HostSummary.interference_pct)."""
        return self.host.interference_pct

    @property
    def gpu_interference_pct(self) -> float | None:
        """Mean SM utilisation of other compute processes, summed over the sampled GPUs."""
        vals = [g.other_util_pct for g in self.gpus]
        return _sum_all(vals) if self.gpus else None

    def total(self, field: str) -> float | None:
        """A GPU field summed over every sampled GPU (power, energy, memory); None unless
        every GPU reported it. For maxima the sum is an upper bound (exact for one GPU)."""
        return _sum_all([getattr(g, field) for g in self.gpus]) if self.gpus else None

    @property
    def gpu_energy_j(self) -> float | None:
        """Total GPU energy, or None unless every sampled GPU reported energy."""
        return _sum_all([g.energy_j for g in self.gpus]) if self.gpus else None


def _sum_all(values: Sequence[float | None]) -> float | None:
    # A partial total would silently understate energy/power, so require every GPU.
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _max(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None
