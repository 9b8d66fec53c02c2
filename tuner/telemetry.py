"""GPU (NVML) and host (psutil) telemetry sampled while a trial's measured requests run.

`TelemetrySampler` collects raw `GpuSample`/`HostSample` records in a background thread;
the pure functions `summarize_gpu`/`summarize_host` turn them into summaries, so the
aggregation is testable without threads or hardware. With a local server it also measures
interference: CPU-seconds other processes used in the window (system busy - tuner - server),
the busiest of them, and other compute processes on the GPUs; `machine_busy` takes the same
measurement for a moment before a study. NVML is initialised once per process
and kept open until interpreter exit (an `atexit` hook calls `nvmlShutdown`): re-initialising
per trial costs tens of milliseconds on real drivers and gains nothing.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field, replace
from types import ModuleType, TracebackType
from typing import Any, Callable, Sequence

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

MIB = 1024 * 1024
_U64 = 1 << 64
# Re-read the server's process tree at most this often: psutil's children() scans every
# process on the host (milliseconds), while reading RSS of known processes is microseconds.
_CHILDREN_REFRESH_S = 1.0
# Reads that cost more than a tick's budget or change slowly (the GPU's process list and
# per-process utilisation, CPU clocks) are taken at the window's edges and about this often.
_SLOW_READ_S = 1.0
# CPU times advance in whole ticks (10 ms on Linux), on every CPU and process read: below
# this window the rounding alone could reach the contended threshold on a small machine.
_MIN_INTERFERENCE_WALL_S = 0.25
# NVML error codes (nvml.h); literal so the pure code never needs pynvml.
_ERR_NOT_SUPPORTED = 3
_ERR_NO_PERMISSION = 4
_ERR_NOT_FOUND = 6
_ERR_DRIVER_NOT_LOADED = 9
_ERR_LIBRARY_NOT_FOUND = 12
_ERR_FUNCTION_NOT_FOUND = 13
_PERMANENT_ERRORS = (_ERR_NOT_SUPPORTED, _ERR_FUNCTION_NOT_FOUND)
_NVML_TEMPERATURE_GPU = 0
_NVML_CLOCK_SM = 1

# nvmlClocksEventReason* / nvmlClocksThrottleReason* bits (same values under both names).
_THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class GpuProbe:
    """Result of probing NVML once per study; `reason` explains unavailability or skipped GPUs."""

    available: bool
    reason: str
    gpus: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class GpuSample:
    """One NVML reading of one GPU; a field is None when its query failed or is unsupported."""

    t: float  # time.perf_counter() seconds
    power_w: float | None = None
    energy_mj: int | None = None  # cumulative counter since driver load
    mem_used_mib: float | None = None
    util_gpu_pct: float | None = None
    util_mem_pct: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: float | None = None
    fan_pct: float | None = None
    throttle_mask: int | None = None
    #: Compute processes other than the tuner and server, and their summed SM utilisation
    #: (%) since the previous such reading; read sparsely, None on other samples.
    other_processes: int | None = None
    other_util_pct: float | None = None


@dataclass(frozen=True)
class HostSample:
    """One psutil reading; CPU times are cumulative so utilisation comes from differences."""

    t: float  # time.perf_counter() seconds
    cpu_busy_s: float | None = None
    cpu_total_s: float | None = None
    mem_used_mib: float | None = None
    server_rss_mib: float | None = None
    #: Cumulative CPU seconds of the tuner and the server tree, read right after the CPU
    #: times at the window's first and last sample only (interference measurement).
    own_cpu_s: float | None = None
    #: The fastest core's clock / its maximum (read sparsely), and the 1-minute load average
    #: (read at the window's edges).
    cpu_freq_ratio: float | None = None
    load_avg_1m: float | None = None


def tokens_per_joule(tokens: int, energy_j: float | None) -> float | None:
    """Tokens per joule, or None when energy is unknown or not positive."""
    if energy_j is None or not math.isfinite(energy_j) or energy_j <= 0:
        return None
    return tokens / energy_j


# ------------------------------------------------------------------ pure aggregation


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _max(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the set bits of an NVML clocks-event/throttle-reason mask, sorted."""
    names = [name for bit, name in _THROTTLE_BITS if mask & bit]
    known = 0
    for bit, _ in _THROTTLE_BITS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_0x{bit:x}")
            rest &= ~bit
        bit <<= 1
    return sorted(names)


def integrate_power_j(samples: Sequence[GpuSample]) -> float | None:
    """Trapezoidal integral of power over sample timestamps (J); None with < 2 power readings."""
    pts = [(s.t, s.power_w) for s in samples if s.power_w is not None]
    if len(pts) < 2:
        return None
    total = 0.0
    for (t0, p0), (t1, p1) in zip(pts, pts[1:]):
        total += 0.5 * (p0 + p1) * (t1 - t0)
    return total


def counter_energy_j(samples: Sequence[GpuSample]) -> float | None:
    """Energy from the cumulative mJ counter (J); None with < 2 counter readings.

    A backwards step is a 64-bit wrap when the previous reading was in the top half of the
    range, otherwise a counter reset (driver reload, GPU reset); for a reset the interval's
    energy is taken from the power integral, or failing that from the new reading
    (energy since the reset, a lower bound).
    """
    pts = [s for s in samples if s.energy_mj is not None]
    if len(pts) < 2:
        return None
    total_mj = 0.0
    for prev, cur in zip(pts, pts[1:]):
        assert prev.energy_mj is not None and cur.energy_mj is not None
        delta: float = cur.energy_mj - prev.energy_mj
        if delta < 0:
            if prev.energy_mj >= _U64 // 2:
                delta += _U64
            elif prev.power_w is not None and cur.power_w is not None:
                delta = 0.5 * (prev.power_w + cur.power_w) * (cur.t - prev.t) * 1000.0
            else:
                delta = cur.energy_mj
        total_mj += delta
    return total_mj / 1000.0


def summarize_gpu(
    index: int,
    name: str | None,
    samples: Sequence[GpuSample],
    baseline_mem_mib: float | None = None,
) -> GpuSummary:
    """Aggregate one GPU's samples; `baseline_mem_mib` is memory used before the trial."""
    energy = counter_energy_j(samples)
    source: str | None = "counter"
    if energy is None:
        energy = integrate_power_j(samples)
        source = "integrated" if energy is not None else None
    peak = _max([s.mem_used_mib for s in samples])
    masks = [s.throttle_mask for s in samples if s.throttle_mask is not None]
    reasons: list[str] | None = None
    if masks:
        combined = 0
        for m in masks:
            combined |= m
        reasons = decode_throttle_reasons(combined)
    return GpuSummary(
        index=index,
        name=name,
        samples=len(samples),
        duration_s=(samples[-1].t - samples[0].t) if samples else None,
        power_mean_w=_mean([s.power_w for s in samples]),
        power_max_w=_max([s.power_w for s in samples]),
        energy_j=energy,
        energy_source=source,
        mem_used_peak_mib=peak,
        mem_increase_mib=(
            peak - baseline_mem_mib if peak is not None and baseline_mem_mib is not None else None
        ),
        util_gpu_mean_pct=_mean([s.util_gpu_pct for s in samples]),
        util_mem_mean_pct=_mean([s.util_mem_pct for s in samples]),
        temp_max_c=_max([s.temp_c for s in samples]),
        sm_clock_mean_mhz=_mean([s.sm_clock_mhz for s in samples]),
        fan_mean_pct=_mean([s.fan_pct for s in samples]),
        throttle_reasons=reasons,
        other_processes=_int_or_none(_max([s.other_processes for s in samples])),
        other_util_pct=_mean([s.other_util_pct for s in samples]),
    )


def _int_or_none(value: float | None) -> int | None:
    return int(value) if value is not None else None


def summarize_host(samples: Sequence[HostSample]) -> HostSummary:
    """Aggregate host samples; CPU % is busy/total time between the first and last reading.

    Interference is measured between the first and last samples that carry `own_cpu_s`:
    system busy time (steal included) minus the tuner's and server's own CPU time, clamped
    at 0; None over windows shorter than `_MIN_INTERFERENCE_WALL_S`.
    """
    cpu = [s for s in samples if s.cpu_busy_s is not None and s.cpu_total_s is not None]
    util: float | None = None
    if len(cpu) >= 2:
        first, last = cpu[0], cpu[-1]
        assert first.cpu_total_s is not None and last.cpu_total_s is not None
        assert first.cpu_busy_s is not None and last.cpu_busy_s is not None
        total = last.cpu_total_s - first.cpu_total_s
        if total > 0:
            util = min(100.0, max(0.0, 100.0 * (last.cpu_busy_s - first.cpu_busy_s) / total))
    wall = foreign = None
    own = [s for s in samples if s.own_cpu_s is not None and s.cpu_busy_s is not None]
    if len(own) >= 2:
        first, last = own[0], own[-1]
        assert first.cpu_busy_s is not None and last.cpu_busy_s is not None
        assert first.own_cpu_s is not None and last.own_cpu_s is not None
        wall = last.t - first.t
        if wall >= _MIN_INTERFERENCE_WALL_S:
            busy = last.cpu_busy_s - first.cpu_busy_s
            foreign = max(0.0, busy - (last.own_cpu_s - first.own_cpu_s))
    loads = [s.load_avg_1m for s in samples if s.load_avg_1m is not None]
    freqs = [s.cpu_freq_ratio for s in samples if s.cpu_freq_ratio is not None]
    return HostSummary(
        samples=len(samples),
        cpu_util_mean_pct=util,
        mem_used_peak_mib=_max([s.mem_used_mib for s in samples]),
        server_rss_peak_mib=_max([s.server_rss_mib for s in samples]),
        wall_s=wall,
        foreign_cpu_s=foreign,
        load_avg_1m=loads[-1] if loads else None,
        cpu_freq_min_ratio=min(freqs) if freqs else None,
    )


#: One process as a start/stop scan saw it: (create_time epoch s, name, user+system CPU s).
ProcessCpu = tuple[float, str, float]


def busiest_process(
    before: dict[int, ProcessCpu],
    after: dict[int, ProcessCpu],
    wall_s: float,
    since: float,
    exclude: set[int] | frozenset[int] = frozenset(),
) -> tuple[str | None, float | None]:
    """The process (not in `exclude`) that used the most CPU between two scans, and its CPU %
    (100 = one core). A process absent from `before` counts in full only when it was created
    after `since` (epoch s); a reused pid is told apart by its create time."""
    best: tuple[float, str] | None = None
    for pid, (created, name, cpu) in after.items():
        if pid in exclude:
            continue
        prev = before.get(pid)
        if prev is not None and prev[0] == created:
            used = cpu - prev[2]
        elif created >= since:
            used = cpu
        else:  # unseen at the start (access denied then, or the scan raced): unknown
            continue
        if used > 0 and (best is None or used > best[0]):
            best = (used, name)
    if best is None or wall_s <= 0:
        return None, None
    return best[1], 100.0 * best[0] / wall_s


# ------------------------------------------------------------------------- NVML access

_nvml_lock = threading.Lock()
_nvml_ready = False
_atexit_registered = False


def _nvml_shutdown() -> None:
    global _nvml_ready
    if not _nvml_ready:
        return
    try:
        import pynvml

        pynvml.nvmlShutdown()
    except Exception:  # exiting anyway
        pass
    _nvml_ready = False


def _init_reason(err: BaseException) -> str:
    code = getattr(err, "value", None)
    if code == _ERR_LIBRARY_NOT_FOUND:
        return "NVML library not found (no NVIDIA driver installed?)"
    if code == _ERR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded"
    if code == _ERR_NO_PERMISSION:
        return "no permission to use NVML"
    return f"NVML init failed: {err}"


def _nvml() -> tuple[ModuleType | None, str]:
    """pynvml with NVML initialised (once per process), or (None, reason)."""
    global _nvml_ready, _atexit_registered
    try:
        import pynvml
    except ImportError:
        return None, "pynvml not installed (pip install nvidia-ml-py)"
    with _nvml_lock:
        if not _nvml_ready:
            try:
                pynvml.nvmlInit()
            except Exception as err:  # NVMLError, or OSError from a broken libnvidia-ml
                return None, _init_reason(err)
            _nvml_ready = True
            if not _atexit_registered:
                atexit.register(_nvml_shutdown)
                _atexit_registered = True
    return pynvml, ""


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class _Device:
    """Open NVML handle plus the fields found permanently unsupported on it."""

    def __init__(self, index: int, handle: Any, name: str | None) -> None:
        self.index = index
        self.handle = handle
        self.name = name
        self.unsupported: set[str] = set()


def _open_devices(nv: ModuleType, indices: list[int] | None) -> tuple[list[_Device], str]:
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception as err:
        return [], f"cannot count GPUs: {err}"
    if count == 0:
        return [], "no NVIDIA GPU found"
    wanted = list(range(count)) if indices is None else list(dict.fromkeys(indices))
    devices: list[_Device] = []
    problems: list[str] = []
    for i in wanted:
        if not 0 <= i < count:
            problems.append(f"GPU index {i} not present ({count} found)")
            continue
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
        except Exception as err:
            problems.append(f"GPU {i} not accessible: {err}")
            continue
        devices.append(_Device(i, handle, _text(_safe(nv.nvmlDeviceGetName, handle))))
    return devices, "; ".join(problems)


def _cuda_version(raw: Any) -> str | None:
    if not isinstance(raw, int) or raw <= 0:
        return None
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def probe_gpus(indices: list[int] | None = None) -> GpuProbe:
    """Describe the NVIDIA GPUs (all, or `indices`); never raises."""
    nv, reason = _nvml()
    if nv is None:
        return GpuProbe(False, reason, [])
    devices, reason = _open_devices(nv, indices)
    if not devices:
        return GpuProbe(False, reason or "no NVIDIA GPU found", [])
    driver = _text(_safe(nv.nvmlSystemGetDriverVersion))
    cuda = _cuda_version(_safe(nv.nvmlSystemGetCudaDriverVersion))
    gpus: list[dict[str, Any]] = []
    for d in devices:
        mem = _safe(nv.nvmlDeviceGetMemoryInfo, d.handle)
        gpus.append(
            {
                "index": d.index,
                "name": d.name,
                "uuid": _text(_safe(nv.nvmlDeviceGetUUID, d.handle)),
                "memory_total_mib": int(mem.total // MIB) if mem is not None else None,
                "driver_version": driver,
                "cuda_version": cuda,
            }
        )
    return GpuProbe(True, reason, gpus)


def host_environment() -> dict[str, Any]:
    """CPU model, core counts, RAM, OS and Python version of this host."""
    env: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": None,
        "cpu_logical_cores": os.cpu_count(),
        "ram_total_mib": None,
        "os": platform.platform(),
        "python_version": platform.python_version(),
    }
    try:
        import psutil

        env["cpu_physical_cores"] = psutil.cpu_count(logical=False)
        env["cpu_logical_cores"] = psutil.cpu_count(logical=True)
        env["ram_total_mib"] = int(psutil.virtual_memory().total // MIB)
    except Exception:  # psutil missing or restricted (containers): keep what os/platform gave
        pass
    return env


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


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


# ---------------------------------------------------------------------------- sampler


class TelemetrySampler:
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

    def _field(self, d: _Device, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        if key in d.unsupported:
            return None
        try:
            return fn(d.handle, *args)
        except Exception as err:
            # Unsupported stays unsupported; anything else (GPU lost, timeout) may recover.
            if getattr(err, "value", None) in _PERMANENT_ERRORS:
                d.unsupported.add(key)
            return None

    def _throttle(self, d: _Device) -> int | None:
        nv = self._nv
        assert nv is not None
        new = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if new is not None and "events" not in d.unsupported:
            value = self._field(d, "events", new)
            if value is not None or "events" not in d.unsupported:
                return int(value) if value is not None else None
        # Drivers older than R535 only have the legacy name.
        old = getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        value = self._field(d, "throttle", old) if old is not None else None
        return int(value) if value is not None else None

    def _read_gpu(self, d: _Device) -> GpuSample:
        nv = self._nv
        assert nv is not None
        t = time.perf_counter()
        power_mw = self._field(d, "power", nv.nvmlDeviceGetPowerUsage)
        energy = self._field(d, "energy", nv.nvmlDeviceGetTotalEnergyConsumption)
        mem = self._field(d, "mem", nv.nvmlDeviceGetMemoryInfo)
        util = self._field(d, "util", nv.nvmlDeviceGetUtilizationRates)
        temp = self._field(d, "temp", nv.nvmlDeviceGetTemperature, _NVML_TEMPERATURE_GPU)
        clock = self._field(d, "clock", nv.nvmlDeviceGetClockInfo, _NVML_CLOCK_SM)
        fan = self._field(d, "fan", nv.nvmlDeviceGetFanSpeed)
        return GpuSample(
            t=t,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            energy_mj=int(energy) if energy is not None else None,
            mem_used_mib=mem.used / MIB if mem is not None else None,
            util_gpu_pct=float(util.gpu) if util is not None else None,
            util_mem_pct=float(util.memory) if util is not None else None,
            temp_c=float(temp) if temp is not None else None,
            sm_clock_mhz=float(clock) if clock is not None else None,
            fan_pct=float(fan) if fan is not None else None,
            throttle_mask=self._throttle(d),
        )

    def _own_pids(self) -> set[int]:
        return {os.getpid(), *self.server_pids, *self._procs}

    def _others(self, pids: Sequence[int], own: set[int]) -> set[int] | None:
        """The pids that are not ours; None when one cannot be told apart: in a container
        NVML reports host pids, and calling the server's own processes foreign would flag
        every trial."""
        ps = self._psutil
        others = {p for p in pids if p not in own}
        if ps is not None and any(not ps.pid_exists(p) for p in others):
            return None
        return others

    def _gpu_others(self, d: _Device) -> tuple[int | None, float | None]:
        """Count of other compute processes now, and their SM % since the previous read."""
        nv = self._nv
        assert nv is not None
        own = self._own_pids()
        running = self._field(d, "procs", nv.nvmlDeviceGetComputeRunningProcesses)
        count: int | None = None
        if running is not None:
            others = self._others([int(p.pid) for p in running], own)
            count = len(others) if others is not None else None
        since = self._util_since.get(d.index)
        self._util_since[d.index] = int(time.time() * 1e6)
        if since is None or "proc_util" in d.unsupported:
            return count, None  # the first read only marks where the window starts
        try:
            util = nv.nvmlDeviceGetProcessUtilization(d.handle, since)
        except Exception as err:
            code = getattr(err, "value", None)
            if code in (_ERR_NOT_FOUND, 0):  # no samples since `since` (pynvml raises SUCCESS for 0)
                return count, 0.0
            if code in _PERMANENT_ERRORS:
                d.unsupported.add("proc_util")
            return count, None
        per_pid: dict[int, list[float]] = {}
        for s in util:
            if int(s.timeStamp) > since:
                per_pid.setdefault(int(s.pid), []).append(float(s.smUtil))
        others = self._others(list(per_pid), own)
        if others is None:
            return count, None
        # Each process's mean over the interval, summed: two processes at 40% are 80% busy.
        return count, sum(sum(per_pid[p]) / len(per_pid[p]) for p in others)

    def _read_host(self, edge: bool = False, slow: bool = False) -> HostSample:
        t = time.perf_counter()
        ps = self._psutil
        if ps is None:
            return HostSample(t=t)
        measure = self.interference and edge
        busy = total = mem = own = load = freq = None
        try:
            ct = ps.cpu_times()
            values = ct._asdict()
            # Mirror psutil.cpu_percent: guest time is already counted in user/nice on Linux.
            total = sum(values.values()) - values.get("guest", 0.0) - values.get("guest_nice", 0.0)
            busy = total - values.get("idle", 0.0) - values.get("iowait", 0.0)
            if measure:
                own = self._own_cpu_s()  # right after, so both describe the same instant
        except Exception:
            pass
        try:
            mem = ps.virtual_memory().used / MIB
        except Exception:
            pass
        if measure:
            load = _load_avg_1m()
        if slow:
            freq = _cpu_freq_ratio(ps)
        return HostSample(
            t=t,
            cpu_busy_s=busy,
            cpu_total_s=total,
            mem_used_mib=mem,
            server_rss_mib=self._server_rss(t),
            own_cpu_s=own,
            cpu_freq_ratio=freq,
            load_avg_1m=load,
        )

    def _own_cpu_s(self) -> float | None:
        """User+system seconds of this process and the server tree (children included)."""
        ps = self._psutil
        if ps is None or self._me is None:
            return None
        procs = dict(self._procs)
        self._own_seen |= {os.getpid(), *procs}
        total = 0.0
        if self._me.pid not in procs:
            ct = self._me.cpu_times()
            total += ct.user + ct.system
        for proc in procs.values():
            try:
                ct = proc.cpu_times()
            except ps.Error:
                continue
            total += ct.user + ct.system
            if proc.pid != os.getpid():
                # A server child that exits mid-window is reaped by its parent, which then holds
                # its time in children_*: counting those keeps the difference continuous.
                total += getattr(ct, "children_user", 0.0) + getattr(ct, "children_system", 0.0)
        return total

    def _refresh_procs(self, force: bool = False) -> None:
        ps = self._psutil
        now = time.perf_counter()
        if ps is None or not self.server_pids:
            return
        if not force and now - self._procs_refreshed < _CHILDREN_REFRESH_S:
            return
        self._procs_refreshed = now
        procs: dict[int, Any] = {}
        for pid in self.server_pids:
            try:
                root = self._procs.get(pid) or ps.Process(pid)
                procs[pid] = root
                if pid == os.getpid():
                    # An in-process engine: the tuner's other children (a build, a neighbour
                    # it started) are not the server.
                    continue
                for child in root.children(recursive=True):
                    procs[child.pid] = self._procs.get(child.pid) or child
            except (ps.Error, ValueError):
                continue
        self._procs = procs

    def _server_rss(self, now: float) -> float | None:
        ps = self._psutil
        if ps is None or not self.server_pids:
            return None
        self._refresh_procs()
        total = 0
        found = False
        for proc in list(self._procs.values()):
            try:
                total += proc.memory_info().rss
                found = True
            except ps.Error:
                continue
        return total / MIB if found else None

    def _scan_processes(self) -> dict[int, ProcessCpu]:
        """Every visible process's CPU seconds (one pass over the process table)."""
        ps = self._psutil
        assert ps is not None
        out: dict[int, ProcessCpu] = {}
        try:
            for p in ps.process_iter(["name", "cpu_times", "create_time"]):
                ct, created = p.info.get("cpu_times"), p.info.get("create_time")
                if ct is None or created is None:  # access denied (other users, macOS)
                    continue
                out[p.pid] = (float(created), p.info.get("name") or str(p.pid), ct.user + ct.system)
        except Exception:  # a partial scan only loses the busiest name
            log.debug("process scan failed", exc_info=True)
        return out

    def _busiest_since_start(self) -> tuple[str | None, float | None]:
        try:
            after = self._scan_processes()
            wall = time.perf_counter() - self._scan0_t
            exclude = self._own_seen | self._own_pids()
            return busiest_process(self._scan0, after, wall, self._scan0_epoch, exclude)
        except Exception:
            log.debug("busiest process failed", exc_info=True)
            return None, None

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


def _load_avg_1m() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows has no load average
        return None


def _cpu_freq_ratio(ps: ModuleType) -> float | None:
    """The fastest core's clock / its maximum, so idle cores clocking down do not count as
    a drop; None where the OS reports no maximum (common in VMs)."""
    try:
        freqs = ps.cpu_freq(percpu=True) or []
    except Exception:
        return None
    ratios = [f.current / f.max for f in freqs if f.max and f.max > 0 and f.current]
    return min(1.0, max(ratios)) if ratios else None


# --------------------------------------------------------------------- machine check


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
