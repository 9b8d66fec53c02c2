"""Host telemetry through psutil: the host's facts, the sampler's reads of CPU times, memory
and the server's processes, interference (CPU-seconds other processes used in the window:
system busy - tuner - server, and the busiest of them), and the pure aggregation of the
host's samples."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

from tuner.telemetry_summary import MIB, HostSummary, _max

# One logger for all telemetry, named as before the modules were split.
log = logging.getLogger("tuner.telemetry")

# Re-read the server's process tree at most this often: psutil's children() scans every
# process on the host (milliseconds), while reading RSS of known processes is microseconds.
_CHILDREN_REFRESH_S = 1.0


# CPU times advance in whole ticks (10 ms on Linux), on every CPU and process read: below
# this window the rounding alone could reach the contended threshold on a small machine.
_MIN_INTERFERENCE_WALL_S = 0.25


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


class _HostReads:
    """The sampler's psutil reads (mixed into :class:`tuner.telemetry.TelemetrySampler`, whose
    state they use): CPU times, memory, the server's process tree, and the process scans
    that name the busiest other process."""

    server_pids: list[int]
    interference: bool
    _psutil: ModuleType | None
    _me: Any
    _procs: dict[int, Any]
    _procs_refreshed: float
    _scan0: dict[int, ProcessCpu]
    _scan0_t: float
    _scan0_epoch: float
    _own_seen: set[int]

    def _own_pids(self) -> set[int]:
        return {os.getpid(), *self.server_pids, *self._procs}

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
