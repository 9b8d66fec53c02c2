"""GPU telemetry through NVML: probing the GPUs once per study, the sampler's reads of one
GPU (and of the other compute processes on it), and the pure aggregation of a GPU's samples.

NVML is initialised once per process and kept open until interpreter exit (an `atexit` hook
calls `nvmlShutdown`): re-initialising per trial costs tens of milliseconds on real drivers
and gains nothing.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tuner.telemetry_summary import MIB, GpuSummary, _max, _mean

_U64 = 1 << 64
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


def tokens_per_joule(tokens: int, energy_j: float | None) -> float | None:
    """Tokens per joule, or None when energy is unknown or not positive."""
    if energy_j is None or not math.isfinite(energy_j) or energy_j <= 0:
        return None
    return tokens / energy_j


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


class _GpuReads:
    """The sampler's NVML reads (mixed into :class:`tuner.telemetry.TelemetrySampler`, whose
    state they use): one sample of a GPU, and the other compute processes on it."""

    _nv: ModuleType | None
    _psutil: ModuleType | None
    _util_since: dict[int, int]

    if TYPE_CHECKING:
        def _own_pids(self) -> set[int]: ...

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
