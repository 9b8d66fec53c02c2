"""Machine facts, from the evidence they are handed: the environment a study records, its
hardware fingerprint, whether a server runs on the measuring machine, whether the model ran
on a GPU, how near two machines are, and how a machine is named.

Pure functions: what this machine reports (NVML, psutil, the OS) is gathered by
:func:`tuner.telemetry.this_machine`, what the server and the model report by the engine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from tuner import __version__
from tuner.record import StudyInfo, read_study_info

#: Offload sources (``GpuOffload.source``) that observed where the model ran: the server's
#: /api/ps, NVML, the llama.cpp build, a recorded grid. "unknown", "--param num_gpu" and test
#: stand-ins decided nothing about it.
OFFLOAD_EVIDENCE = frozenset({"ollama-ps", "nvml", "llama.cpp", "recorded grid"})

#: What ran a study's model, as :func:`accelerator` says it.
GPU = "gpu"                 # GPUs NVML named, and the engine offloaded (or did not say otherwise)
SERVER_GPU = "server-gpu"   # no GPU NVML could see, but the server reported offloading to one
CPU = "cpu"                 # the engine reported running the model on the CPU only
UNKNOWN = "unknown"         # no evidence either way: the label says so instead of guessing

#: Two GPU set-ups are in one VRAM class when their total memory differs by at most this share.
VRAM_CLASS_SHARE = 0.125
#: Labels of how near two machines are (:func:`match`), nearest first.
SAME_HARDWARE, SAME_GPU, SAME_VRAM, SAME_CPU, SAME_CORES = (
    "same hardware", "same GPU model", "same VRAM class", "same CPU model", "same core count")
TIERS = (SAME_HARDWARE, SAME_GPU, SAME_VRAM, SAME_CPU, SAME_CORES)


# ---------------------------------------------------------------------------- recorded facts


def environment(server: Mapping[str, Any], model: Any, here: Mapping[str, Any]) -> dict[str, Any]:
    """Machine and software facts recorded once per study: what the server and the model
    (``ModelInfo``) report, and what this machine reported (``here``: see
    :func:`tuner.telemetry.this_machine`)."""
    return {
        "tuner_version": __version__,
        "engine": server.get("engine"),
        "server_version": server.get("version"),
        "model": model.name,
        "model_digest": model.digest,
        "quantization": model.quantization,
        "parameter_size": model.parameter_size,
        **here,
    }


def hardware_fingerprint(env: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two workers' measurements comparable: CPU, cores, RAM, GPUs."""
    host = env.get("host") or {}
    ram = host.get("ram_total_mib")
    return {
        "cpu": host.get("cpu_model"),
        "cores": host.get("cpu_physical_cores"),
        "ram_gib": round(ram / 1024) if ram else None,
        "gpus": sorted(g.get("name", "") for g in env.get("gpus") or []),
    }


def offloads(study: Mapping[str, Any] | StudyInfo) -> bool | None:
    """Whether a study's model ran with layers on a GPU (True) or on the CPU only (False), from
    its attrs (or :class:`StudyInfo`) or their ``environment``; None when no source that
    observed it said."""
    if isinstance(study, StudyInfo):
        env: Any = study.environment
        source = study.gpu_offload_source
    else:
        env = study.get("environment")
        if not isinstance(env, dict):
            env = study
        source = study.get("gpu_offload_source")
    off = env.get("gpu_offload")
    if not isinstance(off, dict):
        return None
    source = source or off.get("source")
    value = off.get("offloads")
    return value if isinstance(value, bool) and source in OFFLOAD_EVIDENCE else None


# ---------------------------------------------------------------------------- where the server is


def host_name(url: str) -> str:
    """The host of a base URL or a bare ``host:port``, lowercased, an IPv6 address without its
    brackets; "" when there is none or it does not parse."""
    try:
        return urlsplit(url if "://" in url else f"//{url}").hostname or ""
    except ValueError:  # a malformed IPv6 address
        return ""


def is_local(url: str) -> bool:
    """Whether the server at ``url`` (a base URL or ``host:port``) runs on this machine, so its
    hardware is ours to inspect: its host is a loopback name or address. A string test that
    resolves no name, so it also judges hosts stored on another machine."""
    return host_name(url) in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def server_of(study: Mapping[str, Any] | StudyInfo) -> str:
    """"local" when a stored study's server ran on the measuring machine, else its host: what
    the tuner saw then (``server_local``), else whether the stored host is a loopback address."""
    info = read_study_info(study)
    if info.managed_server or info.engine != "ollama":
        return "local"
    local = info.server_local
    if local is True or (local is None and (not info.host or is_local(info.host))):
        return "local"
    return host_name(info.host) or info.host


def remote_server(study: Mapping[str, Any] | StudyInfo) -> str | None:
    """The ``host:port`` of the server a study measured when it is not on the measuring machine
    (see :func:`server_of`), else None."""
    info = read_study_info(study)
    if server_of(info) == "local":
        return None
    host = info.host
    try:
        parts = urlsplit(host if "://" in host else f"//{host}")
    except ValueError:  # not a URL (a malformed IPv6 address): shown as stored
        return host
    return parts.netloc + parts.path.rstrip("/")


# ---------------------------------------------------------------------------- how near two machines are


@dataclass(frozen=True)
class Machine:
    """What two studies' machines are compared by: the stored fingerprint and where the model ran."""

    hardware: dict[str, Any]
    #: Whether the server offloads layers to a GPU (None: not known, as when no source that
    #: observed it said and NVML saw no GPU).
    offloads: bool | None
    vram_mib: float | None
    #: "local" for a server on the measuring machine, else its host (a remote server's
    #: hardware is not the fingerprint's).
    server: str

    @classmethod
    def of(cls, study: Mapping[str, Any] | StudyInfo) -> Machine:
        """The machine a stored study (its user attrs or :class:`StudyInfo`) was measured on."""
        info = read_study_info(study)
        off = offloads(info)
        hw = dict(info.hardware or {})
        gpus = [g for g in info.environment.get("gpus") or [] if isinstance(g, dict)]
        vram = sum(float(g.get("memory_total_mib") or 0) for g in gpus) or None
        return cls(hw, off if off is not None else (bool(hw.get("gpus")) or None), vram, server_of(info))


def match(new: Machine, old: Machine) -> str | None:
    """How near ``old`` is to ``new`` (one of :data:`TIERS`), or None when they are not alike
    (one runs on the CPU only and the other on a GPU, or nothing in common)."""
    if old.offloads is not None and new.offloads is not None and old.offloads != new.offloads:
        return None  # CPU-only is like CPU-only only, and a GPU machine like GPU machines
    if old.hardware == new.hardware and old.server == new.server:
        return SAME_HARDWARE
    if old.server != "local" or new.server != "local":
        return None  # the fingerprint describes the measuring machine, not a remote server's
    if new.offloads:
        gpus, old_gpus = new.hardware.get("gpus") or [], old.hardware.get("gpus") or []
        if gpus and gpus == old_gpus:
            return SAME_GPU
        if new.vram_mib and old.vram_mib and abs(new.vram_mib - old.vram_mib) <= VRAM_CLASS_SHARE * new.vram_mib:
            return SAME_VRAM
        return None
    if new.hardware.get("cpu") and new.hardware.get("cpu") == old.hardware.get("cpu"):
        return SAME_CPU
    if new.hardware.get("cores") and new.hardware.get("cores") == old.hardware.get("cores"):
        return SAME_CORES
    return None


# ---------------------------------------------------------------------------- labels


def accelerator(study: Mapping[str, Any] | StudyInfo) -> str:
    """What ran a study's model, from what the study recorded; UNKNOWN rather than a guess.

    NVML's GPU list (``hardware.gpus``) names the GPUs it sees; an empty list only means NVML
    saw none, so where the model ran is the engine's word (:func:`offloads`, taken only from a
    source that observed it).
    """
    info = read_study_info(study)
    off = offloads(info)
    # NVML sees the measuring machine's GPUs, not a remote server's.
    gpus = info.hardware.get("gpus") if info.hardware is not None and remote_server(info) is None else None
    if gpus:
        return CPU if off is False else GPU
    if off is True:
        return SERVER_GPU
    if off is False:
        return CPU
    return UNKNOWN


_KIND_TEXT = {SERVER_GPU: "GPU (server-reported)", CPU: "CPU-only", UNKNOWN: "GPU not known"}


def gpu_names(gpus: Sequence[str]) -> str:
    """e.g. "NVIDIA H200", "2x NVIDIA H200", "NVIDIA A100 + NVIDIA L4"."""
    counts = Counter(str(g) or "unnamed GPU" for g in gpus)
    return " + ".join(name if n == 1 else f"{n}x {name}" for name, n in sorted(counts.items()))


def _cpu_text(hw: Mapping[str, Any], ram: bool = False) -> str:
    cores = hw.get("cores")
    text = f"{hw.get('cpu') or 'unknown CPU'}, {cores if cores is not None else '?'} cores"
    if ram:
        text += f", {hw['ram_gib']} GiB RAM" if hw.get("ram_gib") is not None else ", RAM unknown"
    return text


def hardware_label(study: Mapping[str, Any] | StudyInfo, detailed: bool = False) -> str:
    """How a study's hardware is shown; ``detailed`` adds the CPU and RAM to tell apart two
    machines that would otherwise read the same (for a remote server: what the server said
    about where the model ran)."""
    info = read_study_info(study)
    server = remote_server(info)
    if server is not None:
        kind = f"{_KIND_TEXT[accelerator(info)]}; " if detailed else ""
        return f"server {server} (remote; {kind}hardware not seen by the tuner)"
    hw = info.hardware
    if hw is None:
        return "hardware not recorded"
    kind = accelerator(info)
    gpus = list(hw.get("gpus") or [])
    if kind == GPU:
        names = gpu_names(gpus)
        return f"{names} ({_cpu_text(hw, ram=True)})" if detailed else names
    head = _KIND_TEXT[kind]
    text = f"{head}: {_cpu_text(hw, ram=detailed)}"
    return text + (f" (GPU not used: {gpu_names(gpus)})" if gpus else "")
