"""GPU (NVML) and host (psutil) telemetry sampled while a trial's measured requests run.

`TelemetrySampler` collects raw `GpuSample`/`HostSample` records in a background thread;
the pure functions `summarize_gpu`/`summarize_host` turn them into summaries, so the
aggregation is testable without threads or hardware. NVML is initialised once per process
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
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import Any, Callable, Sequence

__all__ = [
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
    "integrate_power_j",
    "probe_gpus",
    "summarize_gpu",
    "summarize_host",
    "tokens_per_joule",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_U64 = 1 << 64
# Re-read the server's process tree at most this often: psutil's children() scans every
# process on the host (milliseconds), while reading RSS of known processes is microseconds.
_CHILDREN_REFRESH_S = 1.0
# NVML error codes (nvml.h); literal so the pure code never needs pynvml.
_ERR_NOT_SUPPORTED = 3
_ERR_NO_PERMISSION = 4
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


@dataclass(frozen=True)
class HostSample:
    """One psutil reading; CPU times are cumulative so utilisation comes from differences."""

    t: float  # time.perf_counter() seconds
    cpu_busy_s: float | None = None
    cpu_total_s: float | None = None
    mem_used_mib: float | None = None
    server_rss_mib: float | None = None


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


@dataclass(frozen=True)
class HostSummary:
    """Host aggregates over a sampling window."""

    samples: int
    cpu_util_mean_pct: float | None
    mem_used_peak_mib: float | None
    server_rss_peak_mib: float | None


@dataclass(frozen=True)
class TelemetrySummary:
    """Everything measured during one trial window."""

    gpus: list[GpuSummary]
    host: HostSummary

    def total(self, field: str) -> float | None:
        """A GPU field summed over every sampled GPU (power, energy, memory); None unless
        every GPU reported it. For maxima the sum is an upper bound (exact for one GPU)."""
        return _sum_all([getattr(g, field) for g in self.gpus]) if self.gpus else None

    @property
    def gpu_energy_j(self) -> float | None:
        """Total GPU energy, or None unless every sampled GPU reported energy."""
        return _sum_all([g.energy_j for g in self.gpus]) if self.gpus else None


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


def _sum_all(values: Sequence[float | None]) -> float | None:
    # A partial total would silently understate energy/power, so require every GPU.
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


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
    )


def summarize_host(samples: Sequence[HostSample]) -> HostSummary:
    """Aggregate host samples; CPU % is busy/total time between the first and last reading."""
    cpu = [s for s in samples if s.cpu_busy_s is not None and s.cpu_total_s is not None]
    util: float | None = None
    if len(cpu) >= 2:
        first, last = cpu[0], cpu[-1]
        assert first.cpu_total_s is not None and last.cpu_total_s is not None
        assert first.cpu_busy_s is not None and last.cpu_busy_s is not None
        total = last.cpu_total_s - first.cpu_total_s
        if total > 0:
            util = min(100.0, max(0.0, 100.0 * (last.cpu_busy_s - first.cpu_busy_s) / total))
    return HostSummary(
        samples=len(samples),
        cpu_util_mean_pct=util,
        mem_used_peak_mib=_max([s.mem_used_mib for s in samples]),
        server_rss_peak_mib=_max([s.server_rss_mib for s in samples]),
    )


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
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        gpu_indices: list[int] | None = None,
        server_pids: list[int] | None = None,
        gpus: bool = True,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.gpu_indices = gpu_indices
        self.server_pids = list(server_pids or [])
        self.use_gpus = gpus
        self.gpu_reason = "" if gpus else "GPU sampling disabled"
        self._nv: ModuleType | None = None
        self._devices: list[_Device] = []
        self._gpu_samples: dict[int, list[GpuSample]] = {}
        self._baseline_mem: dict[int, float | None] = {}
        self._host_samples: list[HostSample] = []
        self._psutil: ModuleType | None = None
        self._procs: dict[int, Any] = {}
        self._procs_refreshed = -math.inf
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
        except ImportError:
            log.warning("psutil not installed (pip install psutil): no host telemetry")
        self._sample_once()
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
                self._sample_once()
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

    def _sample_once(self) -> None:
        with self._sample_lock:
            for d in self._devices:
                try:
                    sample = self._read_gpu(d)
                except Exception:  # one sample per tick keeps GPU series aligned
                    log.debug("GPU %d sample failed", d.index, exc_info=True)
                    sample = GpuSample(t=time.perf_counter())
                self._gpu_samples[d.index].append(sample)
            try:
                host = self._read_host()
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

    def _read_host(self) -> HostSample:
        t = time.perf_counter()
        ps = self._psutil
        if ps is None:
            return HostSample(t=t)
        busy = total = mem = None
        try:
            ct = ps.cpu_times()
            values = ct._asdict()
            # Mirror psutil.cpu_percent: guest time is already counted in user/nice on Linux.
            total = sum(values.values()) - values.get("guest", 0.0) - values.get("guest_nice", 0.0)
            busy = total - values.get("idle", 0.0) - values.get("iowait", 0.0)
        except Exception:
            pass
        try:
            mem = ps.virtual_memory().used / MIB
        except Exception:
            pass
        return HostSample(
            t=t,
            cpu_busy_s=busy,
            cpu_total_s=total,
            mem_used_mib=mem,
            server_rss_mib=self._server_rss(t),
        )

    def _server_rss(self, now: float) -> float | None:
        ps = self._psutil
        if ps is None or not self.server_pids:
            return None
        if now - self._procs_refreshed >= _CHILDREN_REFRESH_S:
            self._procs_refreshed = now
            procs: dict[int, Any] = {}
            for pid in self.server_pids:
                try:
                    root = self._procs.get(pid) or ps.Process(pid)
                    procs[pid] = root
                    for child in root.children(recursive=True):
                        procs[child.pid] = self._procs.get(child.pid) or child
                except (ps.Error, ValueError):
                    continue
            self._procs = procs
        total = 0
        found = False
        for proc in list(self._procs.values()):
            try:
                total += proc.memory_info().rss
                found = True
            except ps.Error:
                continue
        return total / MIB if found else None

    def _summarize(self) -> TelemetrySummary:
        gpus = [
            summarize_gpu(
                d.index, d.name, self._gpu_samples.get(d.index, []), self._baseline_mem.get(d.index)
            )
            for d in self._devices
        ]
        return TelemetrySummary(gpus=gpus, host=summarize_host(self._host_samples))
