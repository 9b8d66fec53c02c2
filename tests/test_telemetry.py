"""Tests for tuner/telemetry.py: pure aggregation, a scripted fake NVML, and a real-GPU check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

pynvml = pytest.importorskip("pynvml")
pytest.importorskip("psutil")

from tuner.record import telemetry_attrs  # noqa: E402
from tuner import gpu_telemetry, telemetry  # noqa: E402
from tuner.telemetry import (  # noqa: E402
    BusyReport,
    GpuSample,
    GpuSummary,
    HostSample,
    HostSummary,
    TelemetrySampler,
    TelemetrySummary,
    busiest_process,
    counter_energy_j,
    decode_throttle_reasons,
    host_environment,
    integrate_power_j,
    machine_busy,
    probe_gpus,
    summarize_gpu,
    summarize_host,
    tokens_per_joule,
)

MIB = 1024 * 1024
Mem = namedtuple("Mem", "total free used")
Util = namedtuple("Util", "gpu memory")
Proc = namedtuple("Proc", "pid usedGpuMemory")
ProcUtil = namedtuple("ProcUtil", "pid timeStamp smUtil memUtil encUtil decUtil")


def nvml_error(code: int) -> Exception:
    err: Exception = pynvml.NVMLError(code)
    return err


NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED


class Script:
    """Returns the next scripted value per call, repeating the last one; exceptions are raised
    and callables are called (for values that depend on the time of the call)."""

    def __init__(self, values: list[Any]) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> Any:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        if isinstance(value, BaseException):
            raise value
        return value() if callable(value) else value


class FakeNvml:
    """Scripted stand-in for the pynvml functions the telemetry module calls."""

    def __init__(self, gpus: list[dict[str, list[Any]]], init_error: Exception | None = None):
        self.init_error = init_error
        self.init_calls = 0
        self.gpus = [{k: Script(v) for k, v in g.items()} for g in gpus]
        self.util_since: list[int] = []  # lastSeenTimeStamp of each per-process utilisation call

    def field(self, handle: int, key: str) -> Any:
        script = self.gpus[handle].get(key)
        if script is None:
            raise nvml_error(NOT_SUPPORTED)
        return script()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
        monkeypatch.setattr(gpu_telemetry, "_nvml_ready", False)

        def init() -> None:
            self.init_calls += 1
            if self.init_error is not None:
                raise self.init_error

        fns = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetName": lambda h: self.field(h, "name"),
            "nvmlDeviceGetUUID": lambda h: f"GPU-fake-{h}",
            "nvmlDeviceGetPowerUsage": lambda h: self.field(h, "power_mw"),
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: self.field(h, "energy_mj"),
            "nvmlDeviceGetMemoryInfo": lambda h: self.field(h, "mem"),
            "nvmlDeviceGetUtilizationRates": lambda h: self.field(h, "util"),
            "nvmlDeviceGetTemperature": lambda h, sensor: self.field(h, "temp"),
            "nvmlDeviceGetClockInfo": lambda h, clock: self.field(h, "sm_clock"),
            "nvmlDeviceGetFanSpeed": lambda h: self.field(h, "fan"),
            "nvmlDeviceGetCurrentClocksEventReasons": lambda h: self.field(h, "events"),
            "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: self.field(h, "throttle"),
            "nvmlDeviceGetComputeRunningProcesses": lambda h: self.field(h, "procs"),
            "nvmlDeviceGetProcessUtilization": self.process_utilization,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            "nvmlSystemGetCudaDriverVersion": lambda: 12040,
        }
        for name, fn in fns.items():
            monkeypatch.setattr(pynvml, name, fn)
        return self

    def process_utilization(self, handle: int, since: int) -> Any:
        self.util_since.append(since)
        return self.field(handle, "proc_util")


def mem(used_mib: float, total_mib: float = 24576) -> Mem:
    return Mem(total_mib * MIB, (total_mib - used_mib) * MIB, int(used_mib * MIB))


def constant_gpu(**overrides: list[Any]) -> dict[str, list[Any]]:
    gpu: dict[str, list[Any]] = {
        "name": ["Fake RTX"],
        "power_mw": [150_000],
        "energy_mj": [1_000_000 + 150 * k for k in range(0, 100_000, 10)],
        "mem": [mem(1000), mem(3000)],
        "util": [Util(80, 40)],
        "temp": [60, 61, 65],
        "sm_clock": [1800],
        "fan": [nvml_error(NOT_SUPPORTED)],
        "events": [0x0, 0x4],
    }
    gpu.update(overrides)
    return gpu


@pytest.fixture(autouse=True)
def _no_real_nvml_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_telemetry, "_nvml_ready", False)


# ------------------------------------------------------------------ pure aggregation


def test_summarize_gpu_matches_hand_computed_values() -> None:
    samples = [
        GpuSample(t=0.0, power_w=100.0, mem_used_mib=1000.0, util_gpu_pct=10, util_mem_pct=5,
                  temp_c=50, sm_clock_mhz=1000, fan_pct=30, throttle_mask=0x0),
        GpuSample(t=1.0, power_w=200.0, mem_used_mib=1500.0, util_gpu_pct=90, util_mem_pct=45,
                  temp_c=70, sm_clock_mhz=2000, fan_pct=None, throttle_mask=0x4),
        GpuSample(t=2.0, power_w=None, mem_used_mib=1200.0, util_gpu_pct=None, temp_c=None,
                  throttle_mask=None),
        GpuSample(t=4.0, power_w=300.0, mem_used_mib=None, util_gpu_pct=50, util_mem_pct=25,
                  temp_c=65, sm_clock_mhz=1500, fan_pct=50, throttle_mask=0x4 | 0x40),
    ]
    s = summarize_gpu(0, "Fake", samples, baseline_mem_mib=900.0)
    assert s.samples == 4
    assert s.duration_s == 4.0
    assert s.power_mean_w == 200.0
    assert s.power_max_w == 300.0
    # Trapezoid over readings that exist: (100+200)/2*1 + (200+300)/2*3 = 150 + 750.
    assert s.energy_j == 900.0
    assert s.energy_source == "integrated"
    assert s.mem_used_peak_mib == 1500.0
    assert s.mem_increase_mib == 600.0
    assert s.util_gpu_mean_pct == 50.0
    assert s.util_mem_mean_pct == 25.0
    assert s.temp_max_c == 70
    assert s.sm_clock_mean_mhz == 1500.0
    assert s.fan_mean_pct == 40.0
    assert s.throttle_reasons == ["hw_thermal_slowdown", "sw_power_cap"]


def test_summarize_gpu_without_data_is_all_none() -> None:
    s = summarize_gpu(3, None, [GpuSample(t=0.0), GpuSample(t=0.5)], baseline_mem_mib=None)
    assert s.samples == 2 and s.duration_s == 0.5
    assert s.power_mean_w is None and s.energy_j is None and s.energy_source is None
    assert s.mem_increase_mib is None and s.throttle_reasons is None
    assert summarize_gpu(0, None, []).duration_s is None


def test_counter_and_integrated_energy_agree_on_constant_power() -> None:
    ts = [0.0, 0.1, 0.25, 0.4, 1.0, 1.7]
    samples = [GpuSample(t=t, power_w=250.0, energy_mj=5000 + round(250 * t * 1000)) for t in ts]
    assert counter_energy_j(samples) == pytest.approx(250 * 1.7)
    assert integrate_power_j(samples) == pytest.approx(250 * 1.7)
    assert summarize_gpu(0, None, samples).energy_source == "counter"
    no_counter = [GpuSample(t=s.t, power_w=s.power_w) for s in samples]
    assert summarize_gpu(0, None, no_counter).energy_j == pytest.approx(250 * 1.7)


def test_counter_handles_64bit_wrap() -> None:
    top = 2**64 - 1000
    samples = [GpuSample(t=0.0, energy_mj=top - 500), GpuSample(t=1.0, energy_mj=top),
               GpuSample(t=2.0, energy_mj=500)]
    assert counter_energy_j(samples) == 2.0  # 500 mJ + 1500 mJ across the wrap


def test_counter_reset_uses_power_for_that_interval() -> None:
    samples = [
        GpuSample(t=0.0, power_w=10.0, energy_mj=10_000),
        GpuSample(t=1.0, power_w=10.0, energy_mj=20_000),
        GpuSample(t=2.0, power_w=10.0, energy_mj=100),  # reset (driver reload)
        GpuSample(t=3.0, power_w=10.0, energy_mj=1_100),
    ]
    assert counter_energy_j(samples) == 10.0 + 10.0 + 1.0
    # Without power readings the post-reset value is the only lower bound available.
    bare = [GpuSample(t=s.t, energy_mj=s.energy_mj) for s in samples]
    assert counter_energy_j(bare) == 10.0 + 0.1 + 1.0


def test_counter_skips_failed_reads_and_falls_back_with_one_reading() -> None:
    samples = [GpuSample(t=0.0, power_w=100.0, energy_mj=0),
               GpuSample(t=1.0, power_w=100.0, energy_mj=None),
               GpuSample(t=2.0, power_w=100.0, energy_mj=200_000)]
    assert counter_energy_j(samples) == 200.0
    one = [GpuSample(t=0.0, power_w=100.0, energy_mj=7), GpuSample(t=2.0, power_w=100.0)]
    s = summarize_gpu(0, None, one)
    assert (s.energy_j, s.energy_source) == (200.0, "integrated")


def test_decode_throttle_reasons() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x1 | 0x8 | 0x80) == [
        "gpu_idle", "hw_power_brake_slowdown", "hw_slowdown"]
    assert decode_throttle_reasons(0x4 | 0x1000) == ["sw_power_cap", "unknown_0x1000"]


def test_summarize_host_matches_hand_computed_values() -> None:
    samples = [
        HostSample(t=0.0, cpu_busy_s=100.0, cpu_total_s=400.0, mem_used_mib=2000.0),
        HostSample(t=1.0, cpu_busy_s=None, cpu_total_s=None, mem_used_mib=2600.0,
                   server_rss_mib=900.0),
        HostSample(t=2.0, cpu_busy_s=103.0, cpu_total_s=408.0, mem_used_mib=2500.0,
                   server_rss_mib=950.0),
    ]
    h = summarize_host(samples)
    assert h == HostSummary(samples=3, cpu_util_mean_pct=37.5, mem_used_peak_mib=2600.0,
                            server_rss_peak_mib=950.0)
    assert summarize_host([]) == HostSummary(0, None, None, None)


def test_summarize_host_interference_hand_computed() -> None:
    samples = [
        HostSample(t=10.0, cpu_busy_s=100.0, cpu_total_s=400.0, own_cpu_s=5.0, cpu_freq_ratio=1.0,
                   load_avg_1m=0.5),
        HostSample(t=10.5, cpu_busy_s=101.0, cpu_total_s=402.0, cpu_freq_ratio=0.7),
        HostSample(t=12.0, cpu_busy_s=104.0, cpu_total_s=408.0, own_cpu_s=6.5, cpu_freq_ratio=0.9,
                   load_avg_1m=1.5),
    ]
    h = summarize_host(samples)
    # Busy 4 s over 2 s of wall, 1.5 s of it ours: others used 2.5 CPU-s = 125% of a core.
    assert (h.wall_s, h.foreign_cpu_s) == (2.0, 2.5)
    assert h.interference_pct == 125.0
    assert h.load_avg_1m == 1.5 and h.cpu_freq_min_ratio == 0.7
    # Own time above the system's (tick rounding) clamps at 0, never negative.
    clamped = summarize_host([HostSample(t=0.0, cpu_busy_s=1.0, own_cpu_s=1.0),
                              HostSample(t=1.0, cpu_busy_s=1.5, own_cpu_s=1.52)])
    assert clamped.foreign_cpu_s == 0.0 and clamped.interference_pct == 0.0
    # Too short a window to beat tick rounding: measured as unknown, not as 0.
    short = summarize_host([HostSample(t=0.0, cpu_busy_s=1.0, own_cpu_s=0.0),
                            HostSample(t=0.1, cpu_busy_s=1.2, own_cpu_s=0.0)])
    assert short.foreign_cpu_s is None and short.interference_pct is None
    # Without own-CPU readings (interference off) nothing is claimed.
    off = summarize_host([HostSample(t=0.0, cpu_busy_s=1.0), HostSample(t=2.0, cpu_busy_s=3.0)])
    assert off.wall_s is None and off.interference_pct is None and off.load_avg_1m is None


def test_busiest_process() -> None:
    before = {10: (100.0, "build", 50.0), 11: (100.0, "idle", 1.0), 12: (100.0, "old", 9.0),
              1: (1.0, "tuner", 10.0)}
    after = {10: (100.0, "build", 50.8), 11: (100.0, "idle", 1.0),
             12: (205.0, "reused", 0.9),  # pid reused by a process born in the window
             13: (205.0, "new", 0.5), 14: (150.0, "unseen", 30.0), 1: (1.0, "tuner", 19.0)}
    assert busiest_process(before, after, 2.0, since=200.0, exclude={1}) == ("reused", 45.0)
    name, pct = busiest_process(before, {10: after[10]}, 2.0, since=200.0)
    assert name == "build" and pct == pytest.approx(40.0)
    assert busiest_process(before, before, 2.0, since=200.0) == (None, None)
    assert busiest_process(before, after, 2.0, since=200.0, exclude={1, 10, 12, 13}) == (None, None)


def _gpu_summary(index: int, **kw: Any) -> GpuSummary:
    base: dict[str, Any] = dict(
        index=index, name="Fake", samples=10, duration_s=1.0, power_mean_w=100.0,
        power_max_w=150.0, energy_j=100.0, energy_source="counter", mem_used_peak_mib=2000.0,
        mem_increase_mib=500.0, util_gpu_mean_pct=90.0, util_mem_mean_pct=30.0,
        temp_max_c=70.0, sm_clock_mean_mhz=1800.0, fan_mean_pct=None, throttle_reasons=[])
    base.update(kw)
    return GpuSummary(**base)


def test_to_attrs_keys_totals_and_none_omitted() -> None:
    summary = TelemetrySummary(
        gpus=[_gpu_summary(0), _gpu_summary(1, power_mean_w=50.0, power_max_w=200.0,
                                            energy_j=40.0, throttle_reasons=["sw_power_cap"])],
        host=HostSummary(samples=11, cpu_util_mean_pct=12.5, mem_used_peak_mib=4000.0,
                         server_rss_peak_mib=None),
    )
    attrs = telemetry_attrs(summary)
    json.dumps(attrs)
    assert attrs["gpu0_power_mean_w"] == 100.0
    assert attrs["gpu1_energy_j"] == 40.0
    assert attrs["gpu0_energy_source"] == "counter"
    assert attrs["gpu0_util_mean_pct"] == 90.0
    assert attrs["gpu0_mem_util_mean_pct"] == 30.0
    assert attrs["gpu0_throttle_reasons"] == []
    assert attrs["gpu1_throttle_reasons"] == ["sw_power_cap"]
    assert attrs["gpu1_samples"] == 10
    assert attrs["gpu_energy_j"] == 140.0
    assert attrs["gpu_power_mean_w"] == 150.0
    assert attrs["gpu_power_max_w"] == 350.0
    assert attrs["gpu_mem_used_peak_mib"] == 4000.0
    assert attrs["gpu_mem_increase_mib"] == 1000.0
    assert attrs["host_cpu_util_mean_pct"] == 12.5
    assert attrs["host_samples"] == 11
    assert "gpu0_fan_mean_pct" not in attrs and "server_rss_peak_mib" not in attrs
    assert summary.gpu_energy_j == 140.0
    expected = {f"gpu{i}_{k}" for i in (0, 1) for k in (
        "power_mean_w", "power_max_w", "energy_j", "energy_source", "mem_used_peak_mib",
        "mem_increase_mib", "util_mean_pct", "mem_util_mean_pct", "temp_max_c",
        "sm_clock_mean_mhz", "throttle_reasons", "samples")}
    expected |= {"gpu_energy_j", "gpu_power_mean_w", "gpu_power_max_w", "gpu_mem_used_peak_mib",
                 "gpu_mem_increase_mib", "host_cpu_util_mean_pct", "host_mem_used_peak_mib",
                 "host_samples"}
    assert set(attrs) == expected


def test_to_attrs_total_omitted_when_one_gpu_lacks_energy() -> None:
    summary = TelemetrySummary(gpus=[_gpu_summary(0), _gpu_summary(1, energy_j=None,
                                                                   energy_source=None)],
                               host=HostSummary(2, None, None, None))
    attrs = telemetry_attrs(summary)
    assert "gpu_energy_j" not in attrs and "gpu1_energy_source" not in attrs
    assert summary.gpu_energy_j is None


def test_tokens_per_joule() -> None:
    assert tokens_per_joule(500, 250.0) == 2.0
    assert tokens_per_joule(500, None) is None
    assert tokens_per_joule(500, 0.0) is None
    assert tokens_per_joule(500, float("nan")) is None


# ----------------------------------------------------------------------- fake NVML


def test_probe_with_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([constant_gpu(name=["GPU A"]), constant_gpu(name=[b"GPU B"])]).install(monkeypatch)
    probe = probe_gpus()
    assert probe.available and probe.reason == ""
    assert probe.gpus == [
        {"index": 0, "name": "GPU A", "uuid": "GPU-fake-0", "memory_total_mib": 24576,
         "driver_version": "550.54.15", "cuda_version": "12.4"},
        {"index": 1, "name": "GPU B", "uuid": "GPU-fake-1", "memory_total_mib": 24576,
         "driver_version": "550.54.15", "cuda_version": "12.4"},
    ]
    assert [g["index"] for g in probe_gpus([1]).gpus] == [1]
    partial = probe_gpus([1, 7])
    assert partial.available and "7" in partial.reason
    missing = probe_gpus([7])
    assert not missing.available and "GPU index 7 not present" in missing.reason


def test_probe_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([]).install(monkeypatch)
    assert probe_gpus() == telemetry.GpuProbe(False, "no NVIDIA GPU found", [])


@pytest.mark.parametrize(
    ("code", "expected"),
    [(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
     (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver not loaded")],
)
def test_nvml_init_failure_gives_reason_and_host_only(
    monkeypatch: pytest.MonkeyPatch, code: int, expected: str
) -> None:
    FakeNvml([constant_gpu()], init_error=nvml_error(code)).install(monkeypatch)
    probe = probe_gpus()
    assert not probe.available and probe.reason.startswith(expected) and probe.gpus == []
    with TelemetrySampler(interval_s=0.01) as sampler:
        _until(sampler, 2)
    summary = sampler.summary
    assert summary is not None and summary.gpus == []
    assert summary.host.samples >= 2 and summary.host.mem_used_peak_mib is not None
    assert sampler.gpu_reason.startswith(expected)
    assert "gpu_energy_j" not in telemetry_attrs(summary)


def test_missing_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    probe = probe_gpus()
    assert not probe.available and "pynvml not installed" in probe.reason
    sampler = TelemetrySampler(interval_s=0.01)
    sampler.start()
    summary = sampler.stop()
    assert summary.gpus == [] and summary.host.samples >= 2


def test_nvml_initialised_once(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([constant_gpu()]).install(monkeypatch)
    probe_gpus()
    for _ in range(3):
        with TelemetrySampler(interval_s=0.01):
            pass
    assert fake.init_calls == 1


def test_gpus_false_never_touches_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([constant_gpu()]).install(monkeypatch)
    with TelemetrySampler(interval_s=0.01, gpus=False) as sampler:
        pass
    assert fake.init_calls == 0
    assert sampler.summary is not None and sampler.summary.gpus == []


def _until(sampler: TelemetrySampler, n: int) -> None:
    """Wait until ``n`` samples are in: a busy machine slows each one down, so no fixed sleep."""
    deadline = time.monotonic() + 30
    while len(sampler.samples()[1]) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def test_sampler_end_to_end_with_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([constant_gpu(), constant_gpu(name=["Second"], power_mw=[50_000])])
    fake.install(monkeypatch)
    sampler = TelemetrySampler(interval_s=0.01)
    sampler.start()
    assert sampler.is_running
    _until(sampler, 5)
    summary = sampler.stop()
    assert not sampler.is_running
    assert len(summary.gpus) == 2
    g0, g1 = summary.gpus
    assert g0.name == "Fake RTX" and g1.name == "Second"
    assert g0.samples >= 5 and g0.samples == g1.samples == summary.host.samples
    assert g0.power_mean_w == 150.0 and g0.power_max_w == 150.0
    assert g1.power_mean_w == 50.0
    assert g0.energy_source == "counter"
    # Scripted counter: +1500 mJ per call.
    assert g0.energy_j == pytest.approx(1.5 * (g0.samples - 1))
    assert g0.mem_used_peak_mib == 3000.0 and g0.mem_increase_mib == 2000.0
    assert g0.util_gpu_mean_pct == 80.0 and g0.util_mem_mean_pct == 40.0
    assert g0.temp_max_c == 65.0 and g0.sm_clock_mean_mhz == 1800.0
    assert g0.fan_mean_pct is None
    assert g0.throttle_reasons == ["sw_power_cap"]
    assert fake.gpus[0]["fan"].calls == 1  # NOT_SUPPORTED is remembered, not retried
    assert telemetry_attrs(summary)["gpu_power_mean_w"] == 200.0
    raw_gpu, raw_host = sampler.samples()
    assert len(raw_gpu[0]) == g0.samples and len(raw_host) == summary.host.samples


def test_sampler_survives_gpu_lost_and_counter_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    lost = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    FakeNvml([constant_gpu(
        power_mw=[100_000, 100_000, 100_000, lost],
        energy_mj=[50_000, 50_100, 200, 300, lost],
        mem=[mem(1000), mem(1200), lost],
        util=[lost],
        temp=[RuntimeError("unexpected driver failure")],
    )]).install(monkeypatch)
    with TelemetrySampler(interval_s=0.005) as sampler:
        _until(sampler, 6)
    summary = sampler.summary
    assert summary is not None and not sampler.is_running
    g = summary.gpus[0]
    assert g.samples >= 6
    assert g.power_mean_w == 100.0
    assert g.energy_source == "counter"
    assert g.energy_j is not None and g.energy_j > 0.2
    assert g.mem_used_peak_mib == 1200.0 and g.mem_increase_mib == 200.0
    assert g.util_gpu_mean_pct is None and g.temp_max_c is None


def test_throttle_falls_back_to_legacy_function(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    fake = FakeNvml([constant_gpu(events=[gone], throttle=[0x20])]).install(monkeypatch)
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.summary is not None
    assert sampler.summary.gpus[0].throttle_reasons == ["sw_thermal_slowdown"]
    assert fake.gpus[0]["events"].calls == 1


OTHER = os.getppid()  # a process that exists here and is neither the tuner nor the server
HIDDEN = 2**22 + 7  # above Linux's pid_max: a pid from another pid namespace


def _util(*rows: tuple[int, int]) -> Any:
    """Per-process utilisation samples stamped at the time of the call (NVML uses epoch us)."""
    def call() -> list[ProcUtil]:
        now = int(time.time() * 1e6)
        return [ProcUtil(pid, now, sm, 0, 0, 0) for pid, sm in rows] + [ProcUtil(OTHER, 1, 100, 0, 0, 0)]
    return call


@pytest.fixture
def fast_slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_SLOW_READ_S", 0.05)


def test_gpu_other_processes_and_their_utilisation(
    monkeypatch: pytest.MonkeyPatch, fast_slow_reads: None
) -> None:
    me = os.getpid()
    fake = FakeNvml([constant_gpu(
        procs=[[Proc(me, 0)], [Proc(me, 0), Proc(OTHER, 0)]],
        # Ours at 90% is not interference; the other's two samples average 40%; the stale
        # sample (timestamp 1, before the window) is ignored.
        proc_util=[_util((me, 90), (OTHER, 30), (OTHER, 50))],
    )]).install(monkeypatch)
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.3)
    assert sampler.summary is not None
    g = sampler.summary.gpus[0]
    assert g.other_processes == 1 and g.other_util_pct == pytest.approx(40.0)
    assert sampler.summary.gpu_interference_pct == pytest.approx(40.0)
    # Sparse: a few reads over the window, not one per tick; each asks only for new samples.
    calls = fake.gpus[0]["procs"].calls
    assert 3 <= calls < g.samples / 2
    assert fake.util_since == sorted(fake.util_since) and len(set(fake.util_since)) == len(fake.util_since)
    attrs = telemetry_attrs(sampler.summary)
    assert attrs["gpu0_other_processes"] == 1 and attrs["gpu0_other_util_pct"] == pytest.approx(40.0)


def test_gpu_server_children_are_not_others(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server is a process of its own whose child runs the model (Ollama's runner does).
    spawn = ("import subprocess, sys, time\n"
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
             "print(c.pid, flush=True)\ntime.sleep(30)\nc.kill()")
    server = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        runner = int(server.stdout.readline())
        FakeNvml([constant_gpu(procs=[[Proc(runner, 0)]], proc_util=[_util((runner, 95))])]
                 ).install(monkeypatch)
        with TelemetrySampler(interval_s=0.01, server_pids=[server.pid]) as sampler:
            time.sleep(0.05)
        assert sampler.summary is not None
        g = sampler.summary.gpus[0]
        assert (g.other_processes, g.other_util_pct) == (0, 0.0)
    finally:
        for proc in psutil.Process(server.pid).children(recursive=True):
            proc.kill()
        server.kill()
        server.wait()


def test_gpu_others_unknown_when_pids_are_not_ours_to_see(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a container NVML reports host pids: the server itself would look foreign.
    FakeNvml([constant_gpu(procs=[[Proc(HIDDEN, 0)]], proc_util=[_util((HIDDEN, 80))])]
             ).install(monkeypatch)
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.summary is not None
    g = sampler.summary.gpus[0]
    assert g.other_processes is None and g.other_util_pct is None
    assert sampler.summary.gpu_interference_pct is None


def test_gpu_others_unsupported_no_samples_and_failures(
    monkeypatch: pytest.MonkeyPatch, fast_slow_reads: None
) -> None:
    no_samples = nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
    fake = FakeNvml([
        constant_gpu(procs=[nvml_error(NOT_SUPPORTED)], proc_util=[nvml_error(NOT_SUPPORTED)]),
        constant_gpu(procs=[[]], proc_util=[no_samples, pynvml.NVMLError(0)]),
        constant_gpu(procs=[RuntimeError("driver hiccup"), [Proc(OTHER, 0)]],
                     proc_util=[RuntimeError("driver hiccup"), _util((OTHER, 20))]),
    ]).install(monkeypatch)
    with TelemetrySampler(interval_s=0.01) as sampler:
        time.sleep(0.3)
    assert sampler.summary is not None
    g0, g1, g2 = sampler.summary.gpus
    assert g0.other_processes is None and g0.other_util_pct is None
    assert fake.gpus[0]["procs"].calls == 1 and fake.gpus[0]["proc_util"].calls == 1
    # No per-process samples since the last read: nobody used the GPU.
    assert (g1.other_processes, g1.other_util_pct) == (0, 0.0)
    # A failed read loses that read only; the mean is over the reads that worked.
    assert g2.other_processes == 1 and g2.other_util_pct == pytest.approx(20.0)
    assert g0.samples == g1.samples == g2.samples == sampler.summary.host.samples
    assert sampler.summary.gpu_interference_pct is None  # one GPU cannot tell


def test_interference_off_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    fake = FakeNvml([constant_gpu(procs=[[Proc(OTHER, 0)]], proc_util=[_util((OTHER, 50))])]
                    ).install(monkeypatch)

    def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("process table scanned with interference off")

    monkeypatch.setattr(psutil, "process_iter", no_scan)
    with TelemetrySampler(interval_s=0.05, interference=False) as sampler:
        _until(sampler, 2)
    summary = sampler.summary
    assert summary is not None
    h = summary.host
    assert (h.wall_s, h.foreign_cpu_s, h.interference_pct, h.load_avg_1m, h.cpu_freq_min_ratio,
            h.busiest, h.busiest_pct) == (None,) * 7
    assert summary.interference_pct is None and summary.gpu_interference_pct is None
    assert fake.gpus[0]["procs"].calls == 0 and fake.util_since == []
    assert h.samples >= 2 and h.cpu_util_mean_pct is not None  # ordinary telemetry still works
    assert not any(k.startswith(("host_load", "host_busiest")) for k in telemetry_attrs(summary))


def test_sampler_stops_and_joins_when_body_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([constant_gpu()]).install(monkeypatch)
    sampler = TelemetrySampler(interval_s=0.01)
    with pytest.raises(ZeroDivisionError):
        with sampler:
            _until(sampler, 2)
            1 / 0
    assert not sampler.is_running
    assert sampler._thread is not None and not sampler._thread.is_alive()
    assert sampler.summary is not None and sampler.summary.gpus[0].samples >= 2
    assert not any(t.name == "telemetry-sampler" for t in threading.enumerate())


def test_stop_is_prompt_idempotent_and_safe_without_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeNvml([constant_gpu()]).install(monkeypatch)
    sampler = TelemetrySampler(interval_s=10.0)
    sampler.start()
    t0 = time.perf_counter()
    first = sampler.stop()
    assert time.perf_counter() - t0 < 1.0
    assert first.gpus[0].samples == 2  # start + stop samples despite the long interval
    assert sampler.stop() is first
    with pytest.raises(RuntimeError):
        sampler.start()
    never = TelemetrySampler().stop()
    assert never.gpus == [] and never.host.samples == 0
    with pytest.raises(ValueError):
        TelemetrySampler(interval_s=0)


def test_sample_overhead_is_small(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([constant_gpu(), constant_gpu()]).install(monkeypatch)
    sampler = TelemetrySampler(interval_s=10.0, server_pids=[os.getpid()])
    sampler.start()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        sampler._sample_once()
    per_sample = (time.perf_counter() - t0) / n
    sampler.stop()
    assert per_sample < 0.005, f"{per_sample * 1000:.2f} ms per sample"


def test_server_rss_includes_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import psutil

        time.sleep(0.2)
        own = psutil.Process().memory_info().rss / MIB
        kid = psutil.Process(child.pid).memory_info().rss / MIB
        with TelemetrySampler(interval_s=0.01, server_pids=[os.getpid()], gpus=False) as s:
            time.sleep(0.03)
        assert s.summary is not None
        rss = s.summary.host.server_rss_peak_mib
        assert rss is not None and rss >= 0.8 * (own + kid)
    finally:
        child.kill()
        child.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with TelemetrySampler(interval_s=0.01, server_pids=[dead.pid], gpus=False) as s2:
        pass
    assert s2.summary is not None and s2.summary.host.server_rss_peak_mib is None
    assert "server_rss_peak_mib" not in telemetry_attrs(s2.summary)


def test_host_environment() -> None:
    env = host_environment()
    assert set(env) == {"cpu_model", "cpu_physical_cores", "cpu_logical_cores",
                        "ram_total_mib", "os", "python_version"}
    assert env["cpu_logical_cores"] >= 1 and env["ram_total_mib"] > 0
    json.dumps(env)


# ----------------------------------------------------------- interference (real psutil)
# The neighbour's own CPU time is the ground truth: a CI job may load the machine at the
# same time, so checks compare against what was measured alongside, not against fixed 0.

BUSY_LOOP = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"  # bounded even if not killed


@contextmanager
def neighbour(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A process busy-looping one core, under a name of its own, killed on exit."""
    import psutil

    exe = tmp_path / "tuner-neighbour"  # the kernel names a process after the path it ran
    exe.symlink_to(sys.executable)
    proc = subprocess.Popen([str(exe), "-c", BUSY_LOOP])
    try:
        p = psutil.Process(proc.pid)
        deadline = time.monotonic() + 5
        while p.cpu_times().user < 0.05 and time.monotonic() < deadline:  # running, not starting
            time.sleep(0.02)
        yield p, p.name()
    finally:
        proc.kill()
        proc.wait()


def _cpu(p: Any) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


TICKS = 0.06  # CPU times move in 10 ms ticks, on both ends of every difference


def test_neighbour_is_interference_and_the_server_is_not(tmp_path: Path) -> None:
    with TelemetrySampler(gpus=False) as quiet:
        time.sleep(1.0)
    with neighbour(tmp_path) as (n, name):
        # Same window twice: once the neighbour is a stranger, once it is the server.
        with TelemetrySampler(gpus=False) as a, TelemetrySampler(gpus=False, server_pids=[n.pid]) as b:
            c0 = _cpu(n)
            time.sleep(1.2)
            used = _cpu(n) - c0
    q, ha, hb = quiet.summary, a.summary, b.summary
    assert q is not None and ha is not None and hb is not None
    ha_, hb_ = ha.host, hb.host
    assert ha_.foreign_cpu_s is not None and hb_.foreign_cpu_s is not None
    assert ha_.wall_s is not None and ha_.wall_s >= 1.2
    assert used > 0.3, f"neighbour got only {used:.2f} CPU-s in 1.2 s"
    assert ha_.foreign_cpu_s >= used - TICKS
    assert ha.interference_pct is not None and ha.interference_pct > 25
    # Excluding the neighbour removes its time, and only its time.
    assert used - TICKS <= ha_.foreign_cpu_s - hb_.foreign_cpu_s <= used + 0.15
    used_pct = 100 * used / 1.2
    assert ha_.busiest == name or (ha_.busiest_pct or 0) > used_pct
    assert ha_.busiest_pct is not None and ha_.busiest_pct >= used_pct * 0.8
    assert hb_.busiest != name
    assert ha_.load_avg_1m is not None and ha_.load_avg_1m >= 0
    qi = q.interference_pct
    assert qi is not None
    if qi < 25:  # a quiet machine: the neighbour is most of what others did
        assert ha.interference_pct >= qi + 0.8 * used_pct - 10
    else:  # busy before the neighbour came: the check names a cause
        assert q.host.busiest is not None and (q.host.busiest_pct or 0) > 0


def test_a_process_the_tuner_started_is_interference_for_an_in_process_engine(tmp_path: Path) -> None:
    # llama.cpp runs inside the tuner (server_pids = the tuner itself): a busy child of the
    # tuner (a build it started, a benchmark's neighbour) still competes with it.
    with neighbour(tmp_path) as (n, name):
        with TelemetrySampler(gpus=False, server_pids=[os.getpid()]) as s:
            c0 = _cpu(n)
            time.sleep(1.2)
            used = _cpu(n) - c0
    h = s.summary
    assert h is not None and h.host.foreign_cpu_s is not None
    assert h.host.foreign_cpu_s >= used - TICKS
    assert h.interference_pct is not None and h.interference_pct > 25


def test_own_cpu_is_not_interference() -> None:
    spent: list[float] = []

    def spin() -> None:
        t0 = time.thread_time()
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
        spent.append(time.thread_time() - t0)

    # The tuner's own work (here a thread of this process) is not another process's.
    with TelemetrySampler(gpus=False) as sampler:
        worker = threading.Thread(target=spin)
        worker.start()
        worker.join()
    summary = sampler.summary
    assert summary is not None and summary.host.foreign_cpu_s is not None
    edges = [s for s in sampler.samples()[1] if s.own_cpu_s is not None]
    assert len(edges) == 2 and edges[0].cpu_busy_s is not None and edges[-1].cpu_busy_s is not None
    busy = edges[-1].cpu_busy_s - edges[0].cpu_busy_s
    assert spent[0] > 0.3
    assert summary.host.foreign_cpu_s <= busy - spent[0] + TICKS


def test_machine_busy(tmp_path: Path) -> None:
    with neighbour(tmp_path) as (n, name):
        c0, t0 = _cpu(n), time.perf_counter()
        seen = machine_busy(0.8)
        used_pct = 100 * (_cpu(n) - c0) / (time.perf_counter() - t0)
        hidden = machine_busy(0.8, exclude_pids=[n.pid])
    assert isinstance(seen, BusyReport) and seen.seconds == 0.8
    assert seen.interference_pct is not None and seen.interference_pct >= 0.8 * used_pct - 10
    assert seen.busiest == name or (seen.busiest_pct or 0) > used_pct * 0.8
    assert seen.describe().startswith(f"other processes use {seen.interference_pct:.0f}% of a core")
    assert hidden.busiest != name and hidden.interference_pct is not None
    assert BusyReport(1.0, 85.4, "python3", 97.6, None).describe() == (
        "other processes use 85% of a core (busiest: python3 at 98%)")
    assert BusyReport(1.0, None, None, None, None).describe() == (
        "other processes' CPU use cannot be measured here")


# ------------------------------------------------------------------------- real GPU


def _smi(index: int) -> list[float | None]:
    out = subprocess.run(
        ["nvidia-smi", "-i", str(index), "--query-gpu=power.draw,memory.used,temperature.gpu",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout.strip().splitlines()[0]
    values: list[float | None] = []
    for part in out.split(","):
        try:
            values.append(float(part.strip()))
        except ValueError:  # "[N/A]"
            values.append(None)
    return values


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="nvidia-smi not found: no NVIDIA GPU")
def test_real_gpu_matches_nvidia_smi() -> None:
    probe = probe_gpus([0])
    # nvidia-smi exists here, so NVML must work too: a failure is a finding, not a skip.
    assert probe.available, f"nvidia-smi is present but NVML is not: {probe.reason}"
    _smi(0)
    total_mib = probe.gpus[0]["memory_total_mib"] or 0
    smi: list[list[float | None]] = []
    with TelemetrySampler(interval_s=0.1, gpu_indices=[0]) as sampler:
        deadline = time.perf_counter() + 2.0
        while time.perf_counter() < deadline:
            smi.append(_smi(0))
            time.sleep(0.2)
    assert sampler.summary is not None
    g = sampler.summary.gpus[0]
    assert g.samples >= 15 and g.duration_s is not None and g.duration_s >= 1.9
    power = [row[0] for row in smi if row[0] is not None]
    used = [row[1] for row in smi if row[1] is not None]
    temps = [row[2] for row in smi if row[2] is not None]
    if power:
        assert g.power_mean_w is not None
        smi_mean = sum(power) / len(power)
        assert abs(g.power_mean_w - smi_mean) <= max(30.0, 0.25 * smi_mean)
        # Counter and integral should describe the same ~2 s of energy.
        assert g.energy_j is not None and g.energy_j > 0
        integrated = integrate_power_j(sampler.samples()[0][0])
        assert integrated is not None
        assert abs(g.energy_j - integrated) <= max(20.0, 0.3 * integrated)
    if used:
        # NVML v1 "used" includes driver-reserved memory that nvidia-smi lists separately.
        tol = max(1024.0, 0.01 * total_mib)
        assert g.mem_used_peak_mib is not None
        assert min(used) - tol <= g.mem_used_peak_mib <= max(used) + tol
    if temps:
        assert g.temp_max_c is not None
        assert min(temps) - 3 <= g.temp_max_c <= max(temps) + 5
    json.dumps(telemetry_attrs(sampler.summary))
