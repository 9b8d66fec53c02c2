"""How far decode speed is from the memory-bandwidth limit.

Decoding one token reads (about) every weight once, so tokens/s cannot exceed
memory bandwidth / model bytes. The share of that ceiling a config reaches tells whether
more tuning can still pay off.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Roofline:
    """The bandwidth ceiling for decode and the share of it a measured rate reaches."""

    device: str
    bandwidth_gbs: float
    method: str
    model_bytes: int
    ceiling_tps: float
    decode_tps: float

    @property
    def share(self) -> float:
        return self.decode_tps / self.ceiling_tps if self.ceiling_tps > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["share"] = round(self.share, 4)
        return d

    def describe(self) -> str:
        text = (
            f"{self.decode_tps:.1f} tok/s is {self.share:.0%} of the {self.device} bandwidth ceiling "
            f"({self.bandwidth_gbs:.1f} GB/s / {self.model_bytes / 1e6:.0f} MB per token = "
            f"{self.ceiling_tps:.1f} tok/s; {self.method})"
        )
        if self.share > 1.05:
            # Above a physical limit: the model did not run on the memory that was measured.
            text += "; above the ceiling, so the model ran elsewhere (a remote server or a GPU NVML cannot see)"
        return text


def cpu_bandwidth_gbs(size_mib: int = 256, repeats: int = 5) -> float:
    """Best-of-N large array copy: bytes read plus bytes written per second, in GB/s."""
    import numpy as np

    src = np.ones(size_mib * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def gpu_bandwidth_gbs(index: int = 0) -> tuple[float, str] | None:
    """Theoretical bandwidth from NVML: max memory clock x bus width x 2 (double data rate)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None
    return clock_mhz * 1e6 * 2 * bus_bits / 8 / 1e9, name


def roofline(decode_tps: float, model_bytes: int, on_gpu: bool, gpu_index: int = 0) -> Roofline | None:
    """The roofline for a winner; None when the model size is unknown, or when it ran on a GPU
    whose memory clock and bus width NVML does not give (the CPU's ceiling is not its ceiling)."""
    if model_bytes <= 0 or decode_tps <= 0:
        return None
    if on_gpu:
        g = gpu_bandwidth_gbs(gpu_index)
        if g is None:
            return None
        bw, name = g
        return Roofline(f"GPU {gpu_index} ({name})", bw, "NVML memory clock x bus width",
                        model_bytes, bw * 1e9 / model_bytes, decode_tps)
    bw = cpu_bandwidth_gbs()
    return Roofline("CPU", bw, "measured 256 MiB array copy", model_bytes, bw * 1e9 / model_bytes, decode_tps)
