"""GPU (NVML) and host (psutil) telemetry sampled while a trial's measured requests run.

`TelemetrySampler` collects raw `GpuSample`/`HostSample` records in a background thread;
the pure functions `summarize_gpu`/`summarize_host` turn them into summaries, so the
aggregation is testable without threads or hardware. With a local server it also measures
interference: CPU-seconds other processes used in the window (system busy - tuner - server),
the busiest of them, and other compute processes on the GPUs; `machine_busy` takes the same
measurement for a moment before a study. The GPU side lives in :mod:`tuner.gpu_telemetry`,
the host side in :mod:`tuner.host_telemetry`; this module runs both and names what callers use.
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from dataclasses import dataclass, replace
from types import ModuleType, TracebackType
from typing import Any

from tuner.gpu_telemetry import (GpuProbe, GpuSample, _Device, _GpuReads, _nvml, _open_devices, counter_energy_j,
                                 decode_throttle_reasons, integrate_power_j, probe_gpus, summarize_gpu,
                                 tokens_per_joule)
from tuner.host_telemetry import (HostSample, ProcessCpu, _HostReads, busiest_process, host_environment,
                                  summarize_host)
from tuner.telemetry_summary import GpuSummary, HostSummary, TelemetrySummary

__all__ = [
    "BusyReport",
    "GpuProbe",
    "GpuSample",
    "GpuSummary",
    "HostSample",
    "HostSummary",
    "TelemetrySampler",
    "TelemetrySummary",
    "counter_energy_j",
    "decode_throttle_reasons",
    "host_environment",
    "busiest_process",
    "integrate_power_j",
    "machine_busy",
    "probe_gpus",
    "summarize_gpu",
    "summarize_host",
    "this_machine",
    "tokens_per_joule",
]


log = logging.getLogger(__name__)


# Reads that cost more than a tick's budget or change slowly (the GPU's process list and
# per-process utilisation, CPU clocks) are taken at the window's edges and about this often.
_SLOW_READ_S = 1.0


def this_machine() -> dict[str, Any]:
    """This machine as a study records it (:func:`tuner.machine.environment`): the OS, Python,
    host name, the host (:func:`host_environment`) and the GPUs NVML sees. Never raises:
    telemetry must never stop a study."""
    env: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    try:
        env["host"] = host_environment()
        probe = probe_gpus()
        env["gpus"] = probe.gpus if probe.available else []
        if not probe.available:
            env["gpu_unavailable_reason"] = probe.reason
    except Exception as e:
        env["telemetry_error"] = str(e)
    return env


# ---------------------------------------------------------------------------- sampler


class TelemetrySampler(_GpuReads, _HostReads):
    """Samples GPUs and host in a background thread between `start()` and `stop()`.

    Usage: ``with TelemetrySampler() as s: run_requests()`` then ``s.summary``.

    With `interference` on (a local server), it also measures what other processes take
    from the machine over the window: their CPU-seconds (system busy minus this process and
    the server tree, whose pids are `server_pids` and their descendants), the busiest of
    them, the load average, CPU clock drops, and other compute processes on each GPU.
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        gpu_indices: list[int] | None = None,
        server_pids: list[int] | None = None,
        gpus: bool = True,
        interference: bool = True,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.gpu_indices = gpu_indices
        self.server_pids = list(server_pids or [])
        self.use_gpus = gpus
        self.interference = interference
        self.gpu_reason = "" if gpus else "GPU sampling disabled"
        self._nv: ModuleType | None = None
        self._devices: list[_Device] = []
        self._gpu_samples: dict[int, list[GpuSample]] = {}
        self._baseline_mem: dict[int, float | None] = {}
        self._host_samples: list[HostSample] = []
        self._psutil: ModuleType | None = None
        self._me: Any = None  # psutil.Process of this (the tuner's) process
        self._procs: dict[int, Any] = {}
        self._procs_refreshed = -math.inf
        self._slow_t = -math.inf
        self._util_since: dict[int, int] = {}  # NVML per-process samples newer than this (epoch us)
        self._scan0: dict[int, ProcessCpu] = {}
        self._scan0_t = 0.0
        self._scan0_epoch = 0.0
        self._own_seen: set[int] = set()
        self._busiest: tuple[str | None, float | None] = (None, None)
        self._stop_event = threading.Event()
        self._sample_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = False
        self._summary: TelemetrySummary | None = None

    # -- lifecycle

    def start(self) -> None:
        """Record the pre-trial baseline (first sample) and start the sampling thread."""
        if self._started:
            raise RuntimeError("TelemetrySampler can only be started once")
        self._started = True
        if self.use_gpus:
            try:
                nv, reason = _nvml()
                if nv is not None:
                    self._devices, reason = _open_devices(nv, self.gpu_indices)
                    self._nv = nv
                self.gpu_reason = reason
            except Exception as err:  # telemetry must never abort a trial
                self.gpu_reason = f"GPU sampling failed to start: {err}"
                self._devices = []
        for d in self._devices:
            self._gpu_samples[d.index] = []
        try:
            import psutil

            self._psutil = psutil
            self._me = psutil.Process()
        except ImportError:
            log.warning("psutil not installed (pip install psutil): no host telemetry")
        if self.interference and self._psutil is not None:
            # Before the first sample, so the scan's milliseconds stay outside the window.
            self._scan0_t, self._scan0_epoch = time.perf_counter(), time.time()
            self._scan0 = self._scan_processes()
        self._sample_once(edge=True)
        for d in self._devices:
            self._baseline_mem[d.index] = self._gpu_samples[d.index][0].mem_used_mib
        self._thread = threading.Thread(target=self._run, name="telemetry-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> TelemetrySummary:
        """Stop and join the thread, take a final sample and summarise; idempotent."""
        with self._stop_lock:
            if self._summary is not None:
                return self._summary
            self._stop_event.set()
            thread = self._thread
            if thread is not None:
                # A sample is bounded by NVML call latency; the timeout only guards a hung driver.
                thread.join(timeout=max(5.0, 10 * self.interval_s))
                if thread.is_alive():
                    log.warning("telemetry thread did not stop within timeout")
            if self._started and (thread is None or not thread.is_alive()):
                self._sample_once(edge=True)
                if self.interference and self._psutil is not None:
                    self._busiest = self._busiest_since_start()
            self._summary = self._summarize()
            return self._summary

    @property
    def summary(self) -> TelemetrySummary | None:
        """The summary once stopped, else None."""
        return self._summary

    @property
    def is_running(self) -> bool:
        """True while the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def samples(self) -> tuple[dict[int, list[GpuSample]], list[HostSample]]:
        """Copies of the raw samples collected so far (GPU samples keyed by NVML index)."""
        with self._sample_lock:
            return {i: list(s) for i, s in self._gpu_samples.items()}, list(self._host_samples)

    def __enter__(self) -> TelemetrySampler:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- sampling

    def _run(self) -> None:
        next_t = time.perf_counter() + self.interval_s
        while not self._stop_event.wait(max(0.0, next_t - time.perf_counter())):
            try:
                self._sample_once()
            except Exception:  # keep sampling; a lost sample is better than a dead thread
                log.debug("telemetry sample failed", exc_info=True)
            next_t += self.interval_s
            now = time.perf_counter()
            if next_t < now:  # fell behind (slow NVML): skip ahead instead of bursting
                next_t = now + self.interval_s

    def _sample_once(self, edge: bool = False) -> None:
        """One tick; `edge` marks the window's first and last sample (interference reads)."""
        with self._sample_lock:
            now = time.perf_counter()
            slow = self.interference and (edge or now - self._slow_t >= _SLOW_READ_S)
            if slow:
                self._slow_t = now
            if edge and self.interference:
                # The server's newest children must be known before the GPU's process list
                # and the CPU times are read, or their work would count as foreign.
                self._refresh_procs(force=True)
            for d in self._devices:
                try:
                    sample = self._read_gpu(d)
                except Exception:  # one sample per tick keeps GPU series aligned
                    log.debug("GPU %d sample failed", d.index, exc_info=True)
                    sample = GpuSample(t=time.perf_counter())
                if slow:
                    try:
                        count, util = self._gpu_others(d)
                        sample = replace(sample, other_processes=count, other_util_pct=util)
                    except Exception:
                        log.debug("GPU %d process read failed", d.index, exc_info=True)
                self._gpu_samples[d.index].append(sample)
            try:
                host = self._read_host(edge=edge, slow=slow)
            except Exception:
                log.debug("host sample failed", exc_info=True)
                host = HostSample(t=time.perf_counter())
            self._host_samples.append(host)

    def _summarize(self) -> TelemetrySummary:
        gpus = [
            summarize_gpu(
                d.index, d.name, self._gpu_samples.get(d.index, []), self._baseline_mem.get(d.index)
            )
            for d in self._devices
        ]
        host = summarize_host(self._host_samples)
        if self._busiest != (None, None):
            host = replace(host, busiest=self._busiest[0], busiest_pct=self._busiest[1])
        return TelemetrySummary(gpus=gpus, host=host)





@dataclass(frozen=True)
class BusyReport:
    """How much CPU other processes took over a short look at the machine."""

    seconds: float
    interference_pct: float | None  # 100 = one busy core; None when not measurable
    busiest: str | None
    busiest_pct: float | None
    load_avg_1m: float | None

    def describe(self) -> str:
        """'other processes use 85% of a core (busiest: python3 at 98%)'."""
        if self.interference_pct is None:
            return "other processes' CPU use cannot be measured here"
        text = f"other processes use {self.interference_pct:.0f}% of a core"
        if self.busiest:
            text += f" (busiest: {self.busiest} at {self.busiest_pct or 0:.0f}%)"
        return text


def machine_busy(seconds: float = 1.0, exclude_pids: list[int] | None = None) -> BusyReport:
    """Watch the machine for `seconds` (blocking) and report what other processes use.

    Args:
        exclude_pids: the server's pids (their descendants too); this process always is.
    """
    sampler = TelemetrySampler(interval_s=max(seconds, 0.01), server_pids=exclude_pids, gpus=False)
    with sampler:
        time.sleep(seconds)
    host = sampler.stop().host
    return BusyReport(
        seconds=seconds,
        interference_pct=host.interference_pct,
        busiest=host.busiest,
        busiest_pct=host.busiest_pct,
        load_avg_1m=host.load_avg_1m,
    )
